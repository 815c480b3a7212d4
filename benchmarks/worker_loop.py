"""The benchmarks' worker processes: their request loop and the client.

A worker reads one JSON request per line on standard input,
`{"op": NAME, ...}`, calls `ops[NAME](**rest)` and answers with one JSON
line on standard output; an exception becomes `{"error": ...}`, which the
parent (`Worker`) raises. This file imports the standard library only,
so that `torchdeq_worker.py`, run as a script by an interpreter that has
neither keras_deq nor Keras, imports it from its own folder.
"""

import json
import subprocess
import sys


class Worker:
    """A worker process driven from the parent, one request at a time.

    Args:
        command: the worker's command line.
        name: what it is, for errors (`"TorchDEQ"`).
        env: its environment. Defaults to `None` (this one).
        cwd: its working folder. Defaults to `None` (this one).
    """

    def __init__(self, command, name, env=None, cwd=None):
        self.name = name
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )

    def __call__(self, op, **request):
        """Sends `op` with `request`; its answer, or a `RuntimeError`."""
        self.process.stdin.write(json.dumps({"op": op, **request}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"The {self.name} worker exited; see its stderr."
            )
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(
                f"The {self.name} worker failed: {answer['error']}"
            )
        return answer

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def serve(ops: dict) -> None:
    """Answers requests until standard input closes."""
    replies = sys.stdout
    sys.stdout = sys.stderr  # anything the libraries print stays off the pipe
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op not in ops:
                raise ValueError(f"unknown op {op!r}; known: {sorted(ops)}")
            answer = ops[op](**request)
        except Exception as error:  # reported to the parent, which stops
            answer = {"error": f"{type(error).__name__}: {error}"}
        replies.write(json.dumps(answer) + "\n")
        replies.flush()
