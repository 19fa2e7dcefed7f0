"""Compress a corpus once into a ContextStore, then answer questions from the stored contexts.

The store is resumable (rerun this script: stored ids are skipped) and reports its size next to the raw
text's, so you can check the paper's storage claim on your own data.

    python examples/precompute_store.py --tiny --store /tmp/my-store
"""

import argparse
import os
import tempfile

from arccompress import Compressor, ContextStore, Generator

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", default=os.environ.get("ARCCOMPRESS_TINY") == "1")
parser.add_argument("--store", default=None, help="store folder (default: a temporary one)")
parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
args = parser.parse_args()

encoder, decoder = "kyutai/ARC8_Encoder_Mistral", "mistralai/Mistral-7B-v0.3"
if args.tiny:
    from arccompress.tiny import build_tiny_pair

    encoder, decoder = build_tiny_pair(tempfile.mkdtemp())

corpus = {
    f"city-{i}": f"{name} is a city of {pop} inhabitants on the river {river}."
    for i, (name, pop, river) in enumerate([
        ("Lyon", "520,000", "Rhône"), ("Nantes", "320,000", "Loire"), ("Bordeaux", "260,000", "Garonne"),
        ("Strasbourg", "290,000", "Rhine"), ("Toulouse", "500,000", "Garonne"), ("Orléans", "117,000", "Loire"),
    ])
}

compressor = Compressor.from_pretrained(encoder)
store_path = args.store or tempfile.mkdtemp(prefix="arc-store-")
with ContextStore(store_path, dtype=args.dtype, compressor=compressor) as store:
    todo = [k for k in corpus if k not in store]
    store.add_many(todo, compressor.compress([corpus[k] for k in todo]))
    print(f"{store}: {len(todo)} new, {len(corpus) - len(todo)} already there")

stats = ContextStore(store_path).stats()
print(f"{stats['tokens']} tokens -> {stats['embeddings']} embeddings: {stats['bytes_per_token']:.1f} bytes per "
      f"token stored ({args.dtype}) vs {stats['text_bytes_per_token']:.1f} bytes per token of raw text")

# later, possibly in another process: answer from the stored contexts, no encoder pass needed
store = ContextStore(store_path, compressor=compressor)
generator = Generator.from_pretrained(decoder, compressor=compressor)
question = "Which river flows through Nantes?"
answer = generator.answer(question, [store.get("city-1", device=compressor.device)], max_new_tokens=12)
print(f"Q: {question}\nA: {answer!r}")
