"""`arccompress serve`: a RAG service that compresses on the server. Text or stored ids in, answers out.

    from arccompress.serve import ServiceConfig, build_app     # an ASGI app, to run or to mount
    app = build_app(ServiceConfig(encoder="kyutai/ARC8_Encoder_Mistral", decoder="mistralai/Mistral-7B-v0.3",
                                  store="wiki-store", backend="vllm"))

Clients send questions and documents (as text, or as ids of contexts in the server's store) through OpenAI's API;
the service compresses on its own device, reads stored contexts, runs the decoder on a real engine and streams the
answers back. It never accepts tensors from clients. `arccompress.ServiceClient` speaks to it with the Python
prompt language; `deployment(...)` runs it on Ray Serve.
"""

from .app import build_app
from .config import Limits, ServiceConfig
from .ray_serve import deployment
from .service import Service

__all__ = ["Limits", "Service", "ServiceConfig", "build_app", "deployment"]
