"""Compressed RAG as a service: documents go to `arccompress serve` as text or as ids of a store, never as tensors.

Against a running service (`arccompress serve --encoder ... --decoder ... --store wiki-store`):

    python examples/rag_service.py --url http://127.0.0.1:8000 --id doc-17

With --tiny, the script makes a small store, starts `arccompress serve --tiny` on a free local port, asks its
questions through the official openai client and through arccompress.ServiceClient, and stops the server.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from openai import OpenAI

from arccompress import ContextRef, ServiceClient, compress_corpus

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", default=os.environ.get("ARCCOMPRESS_TINY") == "1")
parser.add_argument("--url", help="a running arccompress serve (default with --tiny: one started here)")
parser.add_argument("--id", default="loire", help="the id of a stored context to ask about")
parser.add_argument("--api-key", default=os.environ.get("ARCCOMPRESS_API_KEY"))
args = parser.parse_args()
if not args.tiny and not args.url:
    parser.error("give --url of a running `arccompress serve`, or --tiny to start one on tiny models")

REPORT = ("The Loire is the longest river in France: 1,006 km from the Massif Central to the Atlantic at "
          "Saint-Nazaire. Its valley, between Sully-sur-Loire and Chalonnes, is a UNESCO World Heritage Site.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tiny_service(folder: str) -> tuple[subprocess.Popen, str]:
    """A tiny store with one context, then `arccompress serve --tiny` reading it, up within two minutes."""
    from arccompress.tiny import build_tiny_pair

    encoder, _ = build_tiny_pair()
    store = os.path.join(folder, "store")
    compress_corpus([(args.id, REPORT)], store, encoder=encoder, show_progress=False)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "arccompress.cli", "serve", "--tiny", "--store", store,
                               "--port", str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the service exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("the service did not start within 120 s")


with tempfile.TemporaryDirectory(prefix="arc-service-") as scratch:
    server, url = start_tiny_service(scratch) if args.url is None else (None, args.url.rstrip("/"))
    try:
        # 1. The official openai client: documents are content parts (chat) or prompt parts (completions)
        client = OpenAI(base_url=f"{url}/v1", api_key=args.api_key or "unused")
        model = client.models.list().data[0].id
        stored = {"type": "document", "id": args.id}  # read from the server's store: the encoder is not run
        as_text = {"type": "document", "text": REPORT}  # compressed on the server (batched with other requests)
        out = client.completions.create(model=model, prompt=["Document: ", stored, "\nQuestion: How long is the "
                                                             "Loire?\nAnswer:"], max_tokens=16, temperature=0)
        print("completions:", repr(out.choices[0].text), f"({out.usage.prompt_tokens} prompt positions)")
        stream = client.completions.create(model=model, prompt=["Document: ", as_text, "\nQuestion: Where does the "
                                                                "Loire end?\nAnswer:"], max_tokens=16, stream=True)
        print("streamed:", repr("".join(chunk.choices[0].text for chunk in stream if chunk.choices)))

        # 2. ServiceClient: the prompt language of every arccompress engine, documents as ids or text
        svc = ServiceClient(url, api_key=args.api_key)
        print("A:", repr(svc.answer("How long is the Loire?", [ContextRef(args.id), REPORT], max_new_tokens=16)))
        done = svc.complete([["Document: ", ContextRef(args.id), "\nQuestion: How long?\nAnswer:"]],
                            svc.sampling(max_new_tokens=8))[0]
        print(f"{done.prompt_positions} prompt positions; the stored document saved {done.positions_saved}")
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)  # finishes the requests in flight, then exits 0
            server.wait(60)
