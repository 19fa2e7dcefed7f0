"""How tests/data/format3 was made, kept for the record: run with arccompress at commit aacab70 (store format 3)
first on the path, `python make_format3.py tests/golden OUT`, then OUT/store (less its empty `.lock`) and
OUT/expected.safetensors copied here. Not a test: tests/test_store_convert.py reads what it made."""

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from arccompress import Compressor, ContextStore
from arccompress.compressor import bundled_llama3_tokenizer

golden, out = Path(sys.argv[1]), Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True)
out.mkdir(parents=True)
comp = Compressor.from_pretrained(golden / "encoders" / "arc8-tiny-mistral", tokenizer=bundled_llama3_tokenizer(),
                                  device="cpu")
texts = {f"doc-{i}": f"Document {i} of the old store tells of river {i % 3} and hill {i * 7 % 11}. " * (1 + i % 3)
         for i in range(9)}
texts["quote'id"] = "A document whose id holds a quote."
ids = list(texts)
with ContextStore(out / "store", compressor=comp, codec="bottleneck-int8", flush_every=4) as store:
    store.add_many(ids, comp.compress(list(texts.values())))
got = ContextStore(out / "store", compressor=comp).get_many(ids)  # what format 3 reads: what conversion must keep
save_file({k: c.embeddings.contiguous() for k, c in zip(ids, got)}, out / "expected.safetensors",
          metadata={"texts": json.dumps(texts), "num_tokens": json.dumps([c.num_tokens for c in got])})
