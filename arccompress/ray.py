"""Corpus compression on Ray Data: an actor per GPU (or CPU slot) compresses, write tasks add store fragments.

    import ray
    from arccompress import compress_corpus
    ray.init(address="auto")                       # or let compress_corpus start a local cluster
    compress_corpus("s3-or-local/wiki.parquet", "/shared/wiki-store", encoder="kyutai/ARC8_Encoder_Mistral",
                    codec="pq", engine="ray", num_workers=16, num_gpus_per_worker=1)

The pipeline is plain Ray Data, so it can be built by hand as well:

    ds.map_batches(EncodeBatch, fn_constructor_kwargs=dict(store=path, encoder=name), concurrency=8, num_gpus=1,
                   batch_size=256).write_datasink(StoreDatasink(path))

Actors are restarted and their tasks retried by Ray when they die; a write task writes one fragment named by
the hash of its ids, so a retried write replaces its own file with an identical one instead of adding rows
twice. The store must be on a file system every node sees (NFS, Lustre, a shared disk).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .corpus import EncodeBatch, is_hf_dataset, is_ray_dataset
from .errors import InputError

__all__ = ["EncodeBatch", "StoreDatasink", "run_ray_job"]


def _datasink_base():
    from ray.data import Datasink

    return Datasink


class StoreDatasink(_datasink_base()):  # type: ignore[misc]
    """A Ray Data datasink appending blocks of store rows (from EncodeBatch) to a ContextStore, one fragment
    per write task."""

    def __init__(self, store: str | Path):
        self.store_path = str(store)
        self.rows = 0
        self.tokens = 0

    def write(self, blocks: Any, ctx: Any) -> dict[str, int]:
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        from .store import ContextStore

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"rows": 0, "tokens": 0}
        table = pa.concat_tables(tables, promote_options="permissive")
        ContextStore(self.store_path).append(table, check_ids=False)  # the driver left stored ids out
        return {"rows": table.num_rows, "tokens": int(pa.compute.sum(table.column("num_tokens")).as_py() or 0)}

    def on_write_complete(self, write_result: Any) -> None:
        returns = getattr(write_result, "write_returns", write_result)
        self.rows = sum(r["rows"] for r in returns)
        self.tokens = sum(r["tokens"] for r in returns)


def _keep_rows(batch: Any, skip: list, id_field: str, text_field: str) -> Any:
    """Rows whose id is to be stored, as {id: str, text: str} (ids normalised as the driver did)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = batch.column(id_field)
    if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        ids = pc.cast(ids, pa.string())
    table = pa.table({"id": ids, "text": batch.column(text_field)})
    keep = pc.and_(pc.is_valid(table["id"]), pc.invert(pc.is_in(table["id"], value_set=_cached_skip(skip))))
    return table.filter(keep)


_SKIP: dict[Any, Any] = {}


def _cached_skip(holder: list) -> Any:
    """The ids to leave out, fetched from the object store once per worker process."""
    import ray

    ref = holder[0]
    if ref not in _SKIP:
        _SKIP.clear()
        _SKIP[ref] = ray.get(ref)
    return _SKIP[ref]


def to_ray_dataset(source: Any) -> Any:
    """A Ray Dataset over any compress_corpus source."""
    import ray

    if is_ray_dataset(source):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix in (".jsonl", ".json"):
            return ray.data.read_json(str(path.resolve()), lines=True)
        return ray.data.read_parquet(str(path.resolve()))
    if is_hf_dataset(source):
        return ray.data.from_huggingface(source)
    rows = [dict(item) if isinstance(item, dict) else {"id": item[0], "text": item[1]} for item in source]
    return ray.data.from_items(rows)


def run_ray_job(
    source: Any,
    store: Any,
    skip: set[str],
    *,
    encoder: str | Path,
    chunk_size: int | None,
    batch_size: int,
    num_workers: int | None,
    num_gpus_per_worker: float | None,
    num_cpus_per_worker: float | None,
    id_field: str,
    text_field: str,
    address: str | None,
    compressor_kwargs: dict[str, Any],
) -> int:
    """Compress the source's rows whose ids are not in `skip` into `store` on Ray; return the tokens compressed."""
    import pyarrow as pa
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        ray.init(address=address) if address else ray.init()
    gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus_per_worker is None:
        num_gpus_per_worker = 1 if gpus else 0
    if num_workers is None:
        num_workers = int(gpus // num_gpus_per_worker) if num_gpus_per_worker else 2
    if num_workers < 1:
        raise InputError(f"num_workers must be at least 1 (the cluster has {gpus:g} GPUs)")
    if num_cpus_per_worker is None:
        # GPU workers take one CPU each; CPU workers share the cluster's CPUs but leave one to the pipeline's
        # other stages (reading, re-blocking, writing), which would wait forever without it
        cpus = ray.cluster_resources().get("CPU", 1)
        num_cpus_per_worker = 1.0 if num_gpus_per_worker else max(0.25, (cpus - 1) / num_workers)
    # the same work units as engine="local": consecutive batch_size rows, in the source's order
    DataContext.get_current().execution_options.preserve_order = True
    ds = to_ray_dataset(source)
    skip_ref = ray.put(pa.array(sorted(skip), type=pa.string()))
    # the light stages take no CPU slot: the workers may hold every slot of the cluster
    ds = ds.map_batches(_keep_rows, fn_kwargs={"skip": [skip_ref], "id_field": id_field, "text_field": text_field},
                        batch_format="pyarrow", num_cpus=0, compute=ray.data.TaskPoolStrategy(size=1))
    ds = ds.repartition(target_num_rows_per_block=batch_size, strict=True)
    ds = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs=dict(store=str(store.path), encoder=str(encoder), chunk_size=chunk_size,
                                   **compressor_kwargs),
        compute=ray.data.ActorPoolStrategy(size=num_workers), num_gpus=num_gpus_per_worker or None,
        num_cpus=num_cpus_per_worker,
        batch_size=batch_size, batch_format="numpy",
    )
    sink = StoreDatasink(store.path)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=1)
    return sink.tokens
