"""Few-shot retrieval-augmented QA in the paper's format, every document compressed.

The prompt is `Document: <ctx>\\nQuestion: q\\nAnswer: a\\n\\n` per example, then the question; the answer is
cut at the first blank line, as the paper's evaluation does. Several passages for one question are
compressed separately and placed back to back.

    python examples/rag_fewshot.py --tiny
"""

import argparse
import os

from arccompress import Compressor, Generator, fewshot_qa_prompt

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", default=os.environ.get("ARCCOMPRESS_TINY") == "1")
parser.add_argument("--encoder", default="kyutai/ARC8_Encoder_Llama")
parser.add_argument("--decoder", default="meta-llama/Llama-3.1-8B")
args = parser.parse_args()

encoder, decoder = args.encoder, args.decoder
if args.tiny:
    from arccompress.tiny import build_tiny_pair

    encoder, decoder = build_tiny_pair()

compressor = Compressor.from_pretrained(encoder)
generator = Generator.from_pretrained(decoder, compressor=compressor)

examples = [
    ("Mont Blanc, at 4,806 metres, is the highest mountain of the Alps.", "How high is Mont Blanc?", "4,806 metres"),
    ("The Danube flows through ten countries before reaching the Black Sea.", "Where does the Danube end?",
     "The Black Sea"),
]
retrieved = [
    "The Loire is the longest river in France, at 1,006 km.",
    "It rises in the Massif Central and reaches the Atlantic Ocean at Saint-Nazaire.",
]
questions = ["How long is the Loire?", "Where does the Loire reach the sea?"]

# compress every document once; the prompts share the contexts
passages = compressor.compress(retrieved)
shots = [(ctx, q, a) for ctx, (_, q, a) in zip(compressor.compress([d for d, _, _ in examples]), examples)]
prompts = [fewshot_qa_prompt(q, passages, shots) for q in questions]
outputs = generator.generate(prompts, max_new_tokens=24)  # one batched call
for question, prompt, output in zip(questions, prompts, outputs):
    saved = generator.savings(prompt)
    print(f"Q: {question}\nA: {output.split(chr(10) * 2)[0].strip()!r}")
    print(f"   {saved.num_contexts} compressed passages: {saved.prompt_length} decoder positions "
          f"instead of {saved.full_text_prompt_length}")
