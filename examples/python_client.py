#!/usr/bin/env python3
"""Streams a generation from moa-server with grpcio.

The Python stubs are generated from proto/ at run time (grpc_tools.protoc into a temporary
directory), so the example always matches the server's API. Needs: pip install grpcio grpcio-tools

  python examples/python_client.py --address localhost:50051 --chat "What is the capital of France?"
  python examples/python_client.py --prompt "Once upon a time" --max-tokens 64 --temperature 0.7
"""

import argparse
import importlib
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parents[1] / "proto"


def load_stubs(out_dir: str):
    """Compiles proto/moa/v1/moa.proto into out_dir and imports the generated modules."""
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
                      f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                      str(PROTO_ROOT / "moa" / "v1" / "moa.proto")])
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO_ROOT}/moa/v1/moa.proto")
    sys.path.insert(0, out_dir)
    return (importlib.import_module("moa.v1.moa_pb2"),
            importlib.import_module("moa.v1.moa_pb2_grpc"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="localhost:50051")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="plain text prompt")
    src.add_argument("--chat", help="a user message, rendered with the model's chat template")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pb, pb_grpc = load_stubs(tmp)
        req = pb.GenerateRequest(
            sampling=pb.SamplingParams(temperature=args.temperature, seed=args.seed),
            stop=[s.encode() for s in args.stop])
        if args.top_p is not None:
            req.sampling.top_p = args.top_p
        if args.max_tokens is not None:
            req.max_tokens = args.max_tokens
        if args.prompt is not None:
            req.text = args.prompt.encode()  # `bytes` fields: UTF-8 checked by the server
        else:
            req.chat.messages.add(role="user", content=args.chat.encode())

        with grpc.insecure_channel(args.address) as channel:
            stub = pb_grpc.MoaServiceStub(channel)
            last = None
            try:
                for chunk in stub.Generate(req, timeout=args.timeout):
                    if chunk.request_id:
                        print(f"[request {chunk.request_id}]", file=sys.stderr)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    if chunk.finish_reason:
                        last = chunk
            except grpc.RpcError as e:
                print(f"\npython_client: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            print()
            if last is not None:
                t = last.timings
                print(f"[finish: {pb.FinishReason.Name(last.finish_reason)} | prompt "
                      f"{last.prompt_tokens} tokens, generated {last.generated_tokens} | "
                      f"ttft {t.ttft_seconds:.3f} s, total {t.total_seconds:.3f} s]",
                      file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
