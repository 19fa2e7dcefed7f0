"""A long document in chunked mode: compress it chunk by chunk, read it with one `<Cont>` at the end.

Chunks of `--chunk-size` encoder tokens are compressed in parallel and concatenated in order; memory
stays bounded by the chunk size however long the document is.

    python examples/long_document.py --tiny
"""

import argparse
import os
import time

from arccompress import Compressor, ContextText, Generator

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", default=os.environ.get("ARCCOMPRESS_TINY") == "1")
parser.add_argument("--chunk-size", type=int, default=1024)
args = parser.parse_args()

encoder, decoder = "kyutai/ARC8_Encoder_Mistral", "mistralai/Mistral-7B-v0.3"
if args.tiny:
    from arccompress.tiny import build_tiny_pair

    encoder, decoder = build_tiny_pair()

compressor = Compressor.from_pretrained(encoder)
generator = Generator.from_pretrained(decoder, compressor=compressor)

# a synthetic report: 300 numbered facts, the one asked about buried in the middle
facts = [f"Fact {i}: sensor {i % 17} recorded {100 + 3 * i} units on day {i}." for i in range(300)]
facts[150] = "Fact 150: the calibration engineer on duty was named Ottoline Varga."
document = " ".join(facts)

start = time.perf_counter()
context = compressor.compress(document, chunk_size=args.chunk_size)
print(f"{context}\ncompressed in {time.perf_counter() - start:.2f}s "
      f"({-(-context.num_tokens // args.chunk_size)} chunks of <= {args.chunk_size} tokens)")

prompt = ["Document: ", context, "\nQuestion: Who was the calibration engineer on duty?\nAnswer:"]
print("answer:", generator.generate(prompt, max_new_tokens=16).split("\n\n")[0].strip())

# the same, compressed on the fly inside the prompt
inline = ["Document: ", ContextText(document, chunk_size=args.chunk_size), "\nQuestion: Who?\nAnswer:"]
saved = generator.savings(inline)  # compresses the document once more: savings needs the contexts
print(f"decoder prompt: {saved.prompt_length} positions instead of {saved.full_text_prompt_length}")
