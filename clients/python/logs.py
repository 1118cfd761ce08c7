"""Prints a job's whole output, attempt by attempt, with a stock gRPC client: page by page, each page within the
4 MiB a default client accepts.

    python logs.py unix:///home/me/.queuectl/queuectl.sock job1 > job1.log
"""

import sys

import grpc

from queuectl_grpc.v1 import queue_pb2, queue_pb2_grpc


def main(target: str, job_id: str) -> int:
    out = sys.stdout.buffer
    with grpc.insecure_channel(target) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        run, offset = 0, 0
        while True:
            page = queue.GetJobLogs(queue_pb2.GetJobLogsRequest(id=job_id, run=run, offset=offset))
            for attempt in page.runs:
                if attempt.offset == 0:
                    out.write(f"=== attempt {attempt.run}: {attempt.outcome or 'running'} ===\n".encode())
                out.write(attempt.output)
            run, offset = page.next_run, page.next_offset
            if not page.has_more:
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
