"""A queuectl client in Python, generated from proto/queuectl/v1/queue.proto.

Enqueues a job, lists the queue, follows the job's events until it is final, and prints its output.

    python example.py unix:///home/me/.queuectl/queuectl.sock
"""

import sys

import grpc

from queuectl_grpc.v1 import queue_pb2, queue_pb2_grpc

FINAL = {queue_pb2.JOB_STATE_COMPLETED, queue_pb2.JOB_STATE_DEAD}


def main(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)

        # Subscribe before enqueueing, so that no event of the job is missed.
        events = queue.WatchEvents(queue_pb2.WatchEventsRequest())
        job = queue.Enqueue(queue_pb2.EnqueueRequest(command="echo hello from python", priority=2)).job
        print(f"enqueued {job.id} ({queue_pb2.JobState.Name(job.state)})")

        listing = queue.List(queue_pb2.ListRequest(page_size=10))
        print("queue:", ", ".join(f"{j.id}={queue_pb2.JobState.Name(j.state)}" for j in listing.jobs))

        for event in events:
            kind = event.WhichOneof("event")
            if kind == "job_picked" and event.job_picked.job_id == job.id:
                print(f"worker {event.job_picked.worker} picked {job.id}")
            elif kind == "job_finished" and event.job_finished.job_id == job.id:
                print(f"{job.id} finished: {queue_pb2.JobState.Name(event.job_finished.state)}")
                if event.job_finished.state in FINAL:
                    break
        events.cancel()

        for run in queue.GetJobLogs(queue_pb2.GetJobLogsRequest(id=job.id)).runs:
            print(f"attempt {run.run} ({run.outcome}): {run.output.decode(errors='replace').strip()}")

        try:
            queue.Enqueue(queue_pb2.EnqueueRequest(command="true", priority=11))
        except grpc.RpcError as error:
            print(f"refused: {error.code().name}: {error.details()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
