"""Compressed RAG where RAG engineers build: LangChain, LlamaIndex and Haystack adapters.

    arccompress.integrations.langchain     ArcChatModel, create_compressed_retrieval_chain   [langchain]
    arccompress.integrations.llama_index   ArcResponseSynthesizer                            [llamaindex]
    arccompress.integrations.haystack      ArcGenerator                                      [haystack]

Each sits where the documents meet the model, so that documents travel as documents — compressed by the encoder,
or read from a ContextStore by id — never stuffed into the prompt's text; `documents` holds what the three do
the same way. Importing a framework's module without the framework installed says which extra to install.
"""
