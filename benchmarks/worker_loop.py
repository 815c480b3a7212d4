"""The request loop of the benchmarks' worker processes.

A worker reads one JSON request per line on standard input,
`{"op": NAME, ...}`, calls `ops[NAME](**rest)` and answers with one JSON
line on standard output; an exception becomes `{"error": ...}`, which the
parent reports and stops on. This file imports the standard library only,
so that `torchdeq_worker.py`, run as a script by an interpreter that has
neither keras_deq nor Keras, imports it from its own folder.
"""

import json
import sys


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
