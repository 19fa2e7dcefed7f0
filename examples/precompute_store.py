"""Compress a corpus once into a ContextStore, then answer questions from the stored contexts.

The store is resumable (rerun this script with the same --store: stored ids are skipped), keeps the contexts
compactly (the head's bottleneck in float16 by default, or --codec pq for product quantization) in a Lance
dataset any data tool reads (a folder, or s3:// and friends), and reports its size next to the raw text's.

    python examples/precompute_store.py --tiny --store /tmp/my-store --codec pq
"""

import argparse
import os
import tempfile

from arccompress import Compressor, ContextStore, Generator, compress_corpus

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", default=os.environ.get("ARCCOMPRESS_TINY") == "1")
parser.add_argument("--store", default=None, help="store folder (default: a temporary one, removed at the end)")
parser.add_argument("--codec", default=None, help="bottleneck-float16 (default), int8, pq, float16, ...")
args = parser.parse_args()

encoder, decoder = "kyutai/ARC8_Encoder_Mistral", "mistralai/Mistral-7B-v0.3"
if args.tiny:
    from arccompress.tiny import build_tiny_pair

    encoder, decoder = build_tiny_pair()

cities = [("Lyon", "520,000", "Rhône"), ("Nantes", "320,000", "Loire"), ("Bordeaux", "260,000", "Garonne"),
          ("Strasbourg", "290,000", "Rhine"), ("Toulouse", "500,000", "Garonne"), ("Orléans", "117,000", "Loire")]
# a product quantizer needs a few hundred vectors to train on: repeat the corpus with variations
corpus = [(f"city-{i}-{v}", f"{name} is a city of {pop} inhabitants on the river {river}. " * (v + 1))
          for v in range(40 if args.codec == "pq" else 1) for i, (name, pop, river) in enumerate(cities)]

with tempfile.TemporaryDirectory(prefix="arc-store-") as scratch:
    store_path = args.store or os.path.join(scratch, "store")
    summary = compress_corpus(corpus, store_path, encoder=encoder, codec=args.codec, train_size=512)
    print(summary)

    stats = ContextStore(store_path).stats()
    print(f"{stats['contexts']} contexts ({stats['codec']}): {stats['tokens']} tokens -> {stats['embeddings']} "
          f"embeddings, {stats['bytes_per_token']:.2f} bytes per token stored vs {stats['text_bytes_per_token']:.2f} "
          "bytes per token of raw text")

    # later, possibly in another process: answer from the stored contexts, no encoder pass over the corpus
    compressor = Compressor.from_pretrained(encoder)
    store = ContextStore(store_path, compressor=compressor)
    generator = Generator.from_pretrained(decoder, compressor=compressor)
    question = "Which river flows through Nantes?"
    answer = generator.answer(question, store.get_many(["city-1-0", "city-5-0"], device=compressor.device),
                              max_new_tokens=12)
    print(f"Q: {question}\nA: {answer!r}")
