"""Quickstart: compress a document with ARC8-Encoder and let Mistral-7B (4-bit) answer from it.

    python examples/quickstart.py            # real checkpoints (downloads ~17 GB once; a GPU recommended)
    python examples/quickstart.py --tiny     # tiny random checkpoints built on the spot, offline, seconds
"""

import argparse
import os

from arccompress import Compressor, Generator

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", default=os.environ.get("ARCCOMPRESS_TINY") == "1",
                    help="use tiny random offline checkpoints (also: ARCCOMPRESS_TINY=1)")
args = parser.parse_args()

encoder, decoder = "kyutai/ARC8_Encoder_Mistral", "mistralai/Mistral-7B-v0.3"
if args.tiny:
    from arccompress.tiny import build_tiny_pair

    encoder, decoder = build_tiny_pair()

compressor = Compressor.from_pretrained(encoder)
# 4-bit needs `pip install 'arccompress[quantization]'`; the tiny decoder is too small to need it
generator = Generator.from_pretrained(decoder, compressor=compressor, quantization=None if args.tiny else "4bit")

document = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The majority "
    "of the forest, 60%, is in Brazil, followed by Peru with 13% and Colombia with 10%."
)
context = compressor.compress(document)
print(context)

prompt = ["Document: ", context, "\nQuestion: Which country holds most of the Amazon rainforest?\nAnswer:"]
print("answer:", generator.generate(prompt, max_new_tokens=16).split("\n\n")[0].strip())
saved = generator.savings(prompt)
print(f"decoder prompt: {saved.prompt_length} positions instead of {saved.full_text_prompt_length} with the full text")
