"""Durable jobs (/v1/jobs): an emoji set or a bulk spec drawn outside the Serve replicas, its state on shared storage.

    POST /v1/jobs ──► Ingress (routes.py): the body, the key's quotas (serve/meter.py), the callback URL
                        │
                        ▼
                     JobQueue (queue.py): writes request.json and the `_active` marker; the job waits in line,
                        │  holding no process: per priority, keys served round-robin, `job_slots` drawing at once
                        ▼
                     JobRunner + Drawer (runner.py): the model, drawn a chunk at a time; state.json, the images,
                        │  the zip and manifest (files.py), the webhooks (hooks.py); then the slot goes back
                        ▼
                     <jobs_uri>/<owner>/<job id>/  request.json  state.json  images/  result/   (store.py)

    GET /v1/jobs/{id}         the state, progress and, while it waits, its place in line and an ETA
    GET /v1/jobs/{id}/events  the same as server-sent events (events.py), resumed after Last-Event-ID
    DELETE /v1/jobs/{id}      cancel; `Cancel-After` on the POST does it at a deadline

The owner of a job is its API key's immutable id (`ApiKey.owner`, `key-<16 hex>`, serve/keys.py), or `_local`
on a server without keys; never the key's name, which a later key can be given after a revoke. A key sees only
its own jobs: they live under its owner id, and a job id under another key is a 404.

Detached actors, not Ray jobs (a job driver per job would only add start-up time): the queue and the runners
outlive a Serve app's restart, redeploy or delete, and everything a reader needs is on the shared storage. A
runner that dies with its node is restarted by Ray and resumes after the last chunk it recorded; if even that is
gone (a RayService upgrade replaces the whole cluster), the ingresses' sweeps put every job marked unfinished
under `<jobs_uri>/_active/` back in line, and so does the job's next GET.

Idempotency: with an `Idempotency-Key` header the job id is a hash of the job's owner and that header, so a replay
names the same job; the queue makes each job once (its calls run one at a time), so ten concurrent duplicates
make one job, and the same header with another body is told apart by the body's hash (409).
"""
