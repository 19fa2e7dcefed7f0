"""Engines behind HTTP (httpx only: `pip install 'arccompress[client]'`).

    http          bounded exchanges: a deadline per request (and per gap in a stream), answers capped in size
    replies       OpenAI's completions API as both clients read it: model cards, choices, streams
    vllm_server   VLLMClient: prompts laid out here, sent to a vLLM server as prompt embeddings
    service       ServiceClient: documents (text or stored ids) sent to `arccompress serve`, never tensors
    routing       which upstream serves a request: document affinity by rendezvous hashing, with bounded load
    fleet         AsyncVLLMFleet: vLLM servers as one async engine (`arccompress serve --upstream`): health, failover
"""
