"""`gemma2 serve`'s options, apart from the server so that building the CLI's parser imports no web stack."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the bundled demo model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    parser.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429 (default 64)")
    parser.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: the model's context)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens read per step (default 512)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype (default bf16)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights after loading")
    parser.add_argument("--group-size", type=int, help="int4 weights per scale: 64, 128 (default) or 256")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health, /version, /metrics)")
    parser.add_argument(
        "--system-prompt",
        choices=["merge", "reject"],
        default="merge",
        help="a system message: merged into the first user turn (default), or refused with a 400",
    )
    parser.add_argument(
        "--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM (default 30)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the cores)")
    parser.add_argument(
        "--tp", type=int, help="tensor-parallel size: run under torchrun with this many processes (default: all)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
