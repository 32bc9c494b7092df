"""`gemma2 serve`: bind, load the model behind a 503, serve, and drain on SIGTERM.

The port is bound before the model loads, so `/health` answers 503 while loading (what
orchestrators probe) and 200 once ready. The first SIGTERM (or Ctrl-C) starts a drain: `/health`
and new requests answer 503, requests in flight finish for up to --shutdown-timeout seconds, the
rest are aborted, then the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from gemma2.config import Gemma2Config
from gemma2.errors import Gemma2Error
from gemma2.server.app import ServerState, build_app
from gemma2.server.prepare import ServerSettings

log = logging.getLogger("gemma2.server")


def serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    directory, name = _model_dir(args.model)
    config = Gemma2Config.from_pretrained(directory)
    context = config.max_position_embeddings
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0)):
        if value < low:
            raise Gemma2Error(f"{flag} must be >= {low}, got {value}")
    if args.prefill_chunk < 1:
        raise Gemma2Error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.max_model_len is not None and not 1 <= args.max_model_len <= context:
        raise Gemma2Error(f"--max-model-len must be in [1, {context}] (the model's context), got {args.max_model_len}")
    if args.shutdown_timeout < 0:
        raise Gemma2Error(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    settings = ServerSettings(
        model_name=args.served_model_name or name,
        max_model_len=args.max_model_len or context,
        max_batch=args.max_batch,
        vocab_size=config.vocab_size,
        system_prompt=args.system_prompt,
        api_key=args.api_key,
    )
    tp = _join_tensor_parallel(args)
    if tp > 1 and args.rank != 0:  # a follower: no HTTP, rank 0's steps (followers.py)
        from gemma2.server import followers

        engine, _ = _build_engine(args, directory, settings)
        followers.follow(engine, args.control)
        _finish_tensor_parallel()
        return 0
    state = ServerState(settings)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    server = DrainingServer(
        uvicorn.Config(build_app(state), log_level="warning", access_log=False, timeout_graceful_shutdown=5),
        state,
        args.shutdown_timeout,
    )
    loader = threading.Thread(target=_load, args=(args, directory, state, server), daemon=True)
    loader.start()
    # Tests and scripts read this line for the port (with --port 0).
    print(
        f"gemma2 serve: listening on http://{host}:{port} (model {settings.model_name!r})", file=sys.stderr, flush=True
    )
    try:
        server.run(sockets=[sock])
    finally:
        if state.worker is not None:
            state.worker.stop()
            if tp > 1:
                mirrored: Any = state.worker.engine
                mirrored.close()  # the MirroredEngine: the followers stop
                _finish_tensor_parallel()
    return server.exit_code


def _join_tensor_parallel(args: argparse.Namespace) -> int:
    """--tp under torchrun: join the group, and make the followers' control channel (every rank)."""
    from gemma2.distributed import launch

    tp = launch.tensor_parallel_size(args.tp)
    args.tp_size, args.rank, args.control = tp, launch.rank(), None
    if tp > 1:
        from gemma2.server import followers

        args.control = followers.control_group()
        followers.seed_sampling()
    return tp


def _finish_tensor_parallel() -> None:
    from gemma2.distributed import launch

    launch.finish()


def _build_engine(args: argparse.Namespace, directory: Path, settings: ServerSettings) -> tuple[Any, Any]:
    """The model (this rank's shard of it under --tp) and an engine over it; rank 0's is mirrored."""
    import torch

    from gemma2.distributed import launch
    from gemma2.engine import Engine
    from gemma2.heads import Gemma2ForCausalLM

    tp = args.tp_size
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.group_size is not None and args.quantize != "int4":
        raise Gemma2Error("--group-size applies only with --quantize int4")
    model = Gemma2ForCausalLM.from_pretrained(
        directory,
        dtype=dtype,
        quantize=args.quantize,
        group_size=args.group_size,
        tp_plan="auto" if tp > 1 else None,
        device=launch.device() if tp > 1 else "cpu",
    )
    engine: Any = Engine(
        model,
        max_batch=settings.max_batch,
        max_length=settings.max_model_len,
        prefill_chunk=args.prefill_chunk,
        preallocate=False,
    )
    if tp > 1 and args.rank == 0:
        from gemma2.server.followers import MirroredEngine

        engine = MirroredEngine(engine, args.control)
    return engine, model


def _configure_logging(level: str) -> None:
    """Our own handler on stderr: uvicorn's logging setup leaves the root logger alone but unconfigured."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


def _model_dir(model: str | None) -> tuple[Path, str]:
    if model is None:
        from gemma2.io.default_model import default_model

        directory, notice = default_model()
        print(notice, file=sys.stderr)
        return directory, "gemma2-demo"
    from gemma2.io.checkpoint import resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(model)
    return directory, model.rstrip("/").split("/")[-1] if Path(model).exists() else model


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        raise Gemma2Error(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    return sock


def _load(args: argparse.Namespace, directory: Path, state: ServerState, server: DrainingServer) -> None:
    """Load model and tokenizer, start the engine thread, then open the doors."""
    try:
        from gemma2.server.worker import EngineWorker
        from gemma2.tokenizer import Gemma2Tokenizer

        started = time.perf_counter()
        tokenizer = Gemma2Tokenizer.from_pretrained(directory)
        settings = state.settings
        engine, model = _build_engine(args, directory, settings)
        worker = EngineWorker(engine, state.metrics, args.max_queue)
        worker.start()
        state.ready(tokenizer, worker)
        log.info(
            "ready: %s (%s%s, backend %s) in %.1fs; %d rows, context %d",
            directory,
            args.dtype,
            f", {args.quantize}" if args.quantize else "",
            model.backend,
            time.perf_counter() - started,
            settings.max_batch,
            settings.max_model_len,
        )
    except Exception as error:
        log.error("could not load the model: %s", error)
        server.exit_code = 1
        server.should_exit = True


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with an OpenAI server's shutdown manners (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.exit_code = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would re-raise the signal after shutting down, and the exit status would not be 0.
        if self.state.draining:  # a second signal: now
            self.should_exit = self.force_exit = True
            return
        self.state.draining = True
        threading.Thread(target=self._drain, name="gemma2-drain", daemon=True).start()

    def _drain(self) -> None:
        worker = self.state.worker
        if worker is not None:
            log.info("draining: %d request(s) get up to %.0fs", len(worker.jobs), self.shutdown_timeout)
            worker.drain(self.shutdown_timeout)
            time.sleep(0.2)  # let the last answers leave
        log.info("shutting down")
        self.should_exit = True
