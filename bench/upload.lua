-- wrk script of the `upload` scenario (bench/run.py): POST a 1 MiB body to /upload on every
-- request. The backend nginx reads the whole body before it answers 200 "ok\n"
-- (conf/backends.nginx.conf.in). wrk's Transfer/sec counts only what it receives, so run.py
-- reports the upload rate as requests/s x 1 MiB.
wrk.method = "POST"
wrk.path = "/upload"
wrk.body = string.rep("x", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
