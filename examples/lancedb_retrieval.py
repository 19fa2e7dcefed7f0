"""Retrieval and compressed contexts in one table: a ContextStore is a Lance dataset, so LanceDB opens it as a table,
a retrieval vector can live beside each context, and a vector search returns rows that feed a Generator directly.

    1. compress the passages into a store at <db>/passages.lance (any codec; resumable)
    2. add a `vector` column to the same rows: Lance's merge on `id` (your embedding model goes here)
    3. LanceDB: db.open_table("passages").search(query_vector) returns store rows, `store.contexts(rows)` makes
       them contexts (every row's checksum verified), and the Generator answers from them

    python examples/lancedb_retrieval.py --tiny
"""

import argparse
import os
import re
import tempfile
import zlib

import lance
import lancedb
import numpy as np
import pyarrow as pa

from arccompress import Compressor, ContextStore, Generator, compress_corpus

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", default=os.environ.get("ARCCOMPRESS_TINY") == "1")
parser.add_argument("--db", default=None, help="LanceDB folder (default: a temporary one, removed at the end)")
args = parser.parse_args()

encoder, decoder = "kyutai/ARC8_Encoder_Mistral", "mistralai/Mistral-7B-v0.3"
if args.tiny:
    from arccompress.tiny import build_tiny_pair

    encoder, decoder = build_tiny_pair()

passages = {
    "lyon": "Lyon is a city of 520,000 inhabitants where the Saône meets the Rhône.",
    "nantes": "Nantes, 320,000 inhabitants, lies on the Loire near the Atlantic coast.",
    "bordeaux": "Bordeaux is a port on the Garonne, famous for its wine trade.",
    "strasbourg": "Strasbourg stands on the Rhine, at the border with Germany.",
    "orleans": "Orléans lies on a bend of the Loire, south of Paris.",
}


DIM = 256


def embed(text: str) -> np.ndarray:
    """A stand-in for a real embedding model: each word adds a fixed random direction (seeded by the word)."""
    words = re.findall(r"\w+", text.lower())
    vec = sum(np.random.default_rng(zlib.crc32(w.encode())).standard_normal(DIM) for w in words)
    return (vec / np.linalg.norm(vec)).astype(np.float32)


with tempfile.TemporaryDirectory(prefix="arc-lancedb-") as scratch:
    db_path = args.db or scratch
    store_path = os.path.join(db_path, "passages.lance")  # a LanceDB table is <db>/<name>.lance
    compress_corpus(list(passages.items()), store_path, encoder=encoder, show_progress=False)

    # vectors beside the contexts: a column of the same rows, joined on the id
    vectors = pa.table({"id": list(passages), "vector": pa.array([embed(t).tolist() for t in passages.values()],
                                                                 pa.list_(pa.float32(), DIM))})
    lance.dataset(store_path).merge(vectors, left_on="id")

    compressor = Compressor.from_pretrained(encoder)
    store = ContextStore(store_path, compressor=compressor)
    generator = Generator.from_pretrained(decoder, compressor=compressor)
    table = lancedb.connect(db_path).open_table("passages")
    question = "Nantes lies on which river?"
    rows = table.search(embed(question), vector_column_name="vector").limit(2).to_arrow()
    distances = [round(d, 3) for d in rows["_distance"].to_pylist()]
    print(f"retrieved {rows.column('id').to_pylist()} (distances {distances})")
    contexts = store.contexts(rows, device=compressor.device)  # the rows themselves: no second read
    print(contexts[0])
    answer = generator.answer(question, contexts, max_new_tokens=12)
    print(f"Q: {question}\nA: {answer!r}")
