"""Warm node start: a fork server that has torch, timm and MLflow imported, so a node skips ~6 s of imports.

A node is still its own process: `python -m pipeline.stages.<stage> ...` starts (~0.2 s, light imports only),
finds $MIM_FORKSERVER (a Unix socket) and asks the server to fork a child that runs the same module with
the same arguments, working directory, environment and stdin/stdout/stderr (passed as file descriptors).
The child runs exactly the code a cold process runs; the node process waits for it, forwards the signals
it gets (SIGTERM, SIGINT, SIGHUP, SIGUSR1/2) and exits with the child's status. If the node process dies
(SIGKILL), the server kills the child; if the server dies, its children die with it (PR_SET_PDEATHSIG).

A node runs cold (as if no server existed) whenever the server would not run it exactly as a fresh process:
the server refuses a node whose Python, sys.path or start-up environment (torch, OpenMP, BLAS, CUDA, Python
variables, read at import) differs from its own, and no node delegates inside a Slurm
job (its allocation applies to the process it starts) or off Linux.

    snakemake --cores 2              # a server for the run (local jobs; --config forkserver=0: none)
    python -m pipeline.orchestration.forkserver run -- dvc repro     # any command: a server for its lifetime

Inputs: the modules to preload. Outputs: none (the server prints one line when it starts and when it stops).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

ENV = "MIM_FORKSERVER"
# What nodes import from outside the project, measured with py-spy over the tiny study's 91 warm nodes (a module left
# out costs every node its import). tabulate: torch._dynamo imports it at every exit (its atexit dump_compile_times),
# ~0.2 s a forked node; jsonschema: pipeline.config.
PRELOAD = ("numpy", "torch", "torchvision", "timm", "timm.optim", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
           "pandas", "safetensors.torch", "submitit", "jsonschema", "tabulate",
           "matplotlib.figure", "matplotlib.backends.backend_agg")
# read by a library when it is imported: a server started with other values would not run a node as a fresh process
# (not KMP_*: Intel OpenMP's, which torch's Linux builds do not load; scikit-learn sets KMP_DUPLICATE_LIB_OK)
IMPORT_ENV_PREFIXES = ("ATEN_", "ONEDNN_", "DNNL_", "OMP_", "GOMP_", "MKL_", "OPENBLAS_", "CUDA_",
                       "PYTORCH_", "TORCH", "PYTHON", "MPLBACKEND", "MLFLOW_", "LD_")
# thread counts (Snakemake sets them to a job's threads): not compared, a child applies them as a fresh process would
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# read when a run is tracked, not at import: a node may set its own
CALL_TIME_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID",
                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1


def identity(environ: dict | None = None) -> dict:
    """What must be equal in a node process and the server for a forked child to run like a fresh process."""
    env = {k: v for k, v in (environ or os.environ).items()
           if k.startswith(IMPORT_ENV_PREFIXES) and k not in THREAD_ENV and k not in CALL_TIME_ENV}
    return {"python": [sys.prefix, os.path.realpath(sys.executable), sys.version], "path": sys.path[1:], "env": env}


# ---------------------------------------------------------------- the node side

def delegate(module: str, argv: list[str]) -> int | None:
    """Run `python -m module argv` in a child of the server; its exit status, or None to run here (cold)."""
    path = os.environ.get(ENV)
    if not path or sys.platform != "linux" or "SLURM_JOB_ID" in os.environ:
        return None
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
    except OSError:
        return None                                      # no server (any more): run cold
    with conn:
        _send(conn, _request(module, argv), fds=[0, 1, 2])
        reader = conn.makefile("r")
        reply = json.loads(reader.readline() or "{}")
        if "pid" not in reply:                           # refused: this node differs from the server
            print(f"fork server: this node starts cold: {reply.get('refused', 'no reply')}", file=sys.stderr)
            return None
        pid = reply["pid"]
        handlers = {s: signal.signal(s, lambda sig, _f: _kill_group(pid, sig)) for s in FORWARDED_SIGNALS}
        try:
            line = reader.readline()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    if not line:
        print(f"error: the fork server at {path} stopped while this node ran", file=sys.stderr)
        return 1
    status = json.loads(line)["status"]
    if os.WIFSIGNALED(status):                           # die of the same signal, as the child did
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


def _request(module: str, argv: list[str]) -> dict:
    """What a node process sends the server (with its stdin, stdout and stderr): run `python -m module argv` as me."""
    return {"module": module, "argv": argv, "cwd": os.getcwd(), "path0": sys.path[0],
            "env": {k: v for k, v in os.environ.items() if k != ENV}, "identity": identity()}


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _send(conn: socket.socket, message: dict, fds: list[int] = ()) -> None:
    data = (json.dumps(message) + "\n").encode()
    socket.send_fds(conn, [data], list(fds)) if fds else conn.sendall(data)


# ---------------------------------------------------------------- the server side

def serve(path: str, parent: int | None, idle_s: float) -> None:
    """Preload, then fork one child per request until `parent` exits or nothing came for idle_s seconds."""
    started = time.time()
    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    # The preloaded objects out of the cyclic collector's reach: a child's collections then scan only what the node
    # allocates (without, every collection in every child walks the whole preloaded heap, and touches its pages).
    gc.freeze()
    server = {"identity": identity(before),              # what a node's environment is compared with
              "added": {k: v for k, v in os.environ.items() if before.get(k) != v}}   # what the imports set
    me = os.getpid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)                       # clients connect only once the modules are loaded
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    print(f"fork server ready in {time.time() - started:.1f} s ({path})", file=sys.stderr, flush=True)
    children: dict[socket.socket, int] = {}              # connection -> child pid
    last = time.time()
    try:
        while True:
            ready, _, _ = select.select([listener, wake_r, *children], [], [], 1.0)
            for r in ready:
                if r is listener:
                    conn, _ = listener.accept()
                    try:
                        pid = _fork_child(conn, server, listener, [wake_r, wake_w], children)   # a child exits in there
                    except (OSError, ValueError, KeyError, TypeError) as e:   # a broken request: its node is gone
                        print(f"fork server: a request failed ({e!r})", file=sys.stderr, flush=True)
                        conn.close()
                        continue
                    if pid > 0:
                        children[conn] = pid
                elif r is wake_r:
                    os.read(wake_r, 4096)
                elif r in children:                      # the node process closed its end: it was killed
                    _kill_group(children[r], signal.SIGKILL)
            _reap(children)
            if children:
                last = time.time()
            elif (parent and not _alive(parent)) or time.time() - last > idle_s:
                break
    finally:
        if os.getpid() == me:
            for pid in children.values():
                _kill_group(pid, signal.SIGKILL)
            _remove(path)
            print("fork server stopped", file=sys.stderr, flush=True)


def _fork_child(conn: socket.socket, server: dict, listener: socket.socket, pipe: list[int],
                children: dict[socket.socket, int]) -> int:
    """Fork a child for one request: its pid in the server, 0 in the child (after it ran), -1 if refused."""
    conn.settimeout(10)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while data and not data.endswith(b"\n"):            # the rest of a long request (the fds came with its start)
        more = conn.recv(1 << 20)
        if not more:
            break
        data += more
    request = json.loads(data.decode())
    differs = _differs(request["identity"], server["identity"], server["added"])
    if differs or len(fds) != 3:
        _send(conn, {"refused": differs or "no stdin, stdout and stderr came with the request"})
        conn.close()
        for fd in fds:
            os.close(fd)
        return -1
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _become_node(request, server["added"], fds, [listener, conn, *children], pipe)
            code = _run_node(request)
        finally:
            _exit(code)
    try:
        os.setpgid(pid, pid)                             # here too: a signal forwarded at once reaches the child
    except OSError:
        pass
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"pid": pid})
    except OSError:                                      # its node process died before it heard of its child:
        _kill_group(pid, signal.SIGKILL)                 # nothing would stop the child (it holds the node's lock)
        os.waitpid(pid, 0)
        raise
    return pid


def _become_node(request: dict, added: dict, fds: list[int], sockets: list[socket.socket], pipe: list[int]) -> None:
    """In the forked child: the node process's stdio, directory, environment, signals and random state."""
    import ctypes
    import random

    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)   # the server dies -> this node dies
    os.setpgid(0, 0)                                     # its own group: signals reach its subprocesses too
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in sockets:
        s.close()
    for fd in pipe:
        os.close(fd)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    buffering = 1 if os.isatty(1) or request["env"].get("PYTHONUNBUFFERED") else -1
    sys.stdout = os.fdopen(1, "w", buffering=buffering, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**added, **request["env"]})       # a fresh process: its environment, then what imports set
    sys.path[0] = request["path0"]
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[name]                            # the node imports this package from its own folder
    random.seed()                                        # a fresh process's unseeded generators
    sys.modules["numpy"].random.seed()
    _apply_threads(request["env"])


def _differs(node: dict, server: dict, added: dict) -> str:
    """'' if a child of this server runs the node as a fresh process would, else what differs. A variable the
    node has at the value the server's own imports set (`added`) is no difference: its imports would set it too."""
    for key in ("python", "path"):
        if node[key] != server[key]:
            return f"its {key} differs from the server's"
    for name in sorted(set(node["env"]) | set(server["env"])):
        value = node["env"].get(name)
        if value != server["env"].get(name) and not (name in added and value == added[name]):
            return f"${name} differs from the server's (read when torch and the others are imported)"
    return ""


def _apply_threads(env: dict) -> None:
    """The thread counts a fresh process would take from $OMP_NUM_THREADS and the BLAS variables."""
    import torch
    from threadpoolctl import threadpool_limits

    omp = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if omp and omp.isdigit():
        torch.set_num_threads(int(omp))
    blas = env.get("OPENBLAS_NUM_THREADS") or env.get("GOTO_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if blas and blas.isdigit():
        threadpool_limits(int(blas), user_api="blas")


def _run_node(request: dict) -> int:
    import runpy

    sys.argv = [request["module"], *request["argv"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr) or 1))
    except KeyboardInterrupt:
        return 130
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def _exit(code: int) -> None:
    """End the child as interpreter exit would (threads joined, atexit handlers, stdio flushed), without the
    teardown of every module's objects: in a forked child that touches (copies) the whole heap, ~1.4 s."""
    import atexit
    import threading

    try:
        getattr(threading, "_shutdown", lambda: None)()
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    finally:
        os._exit(code)


def _reap(children: dict[socket.socket, int]) -> None:
    for conn, pid in list(children.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            try:
                _send(conn, {"status": status})
            except OSError:
                pass                                     # the node process is gone already
            conn.close()
            del children[conn]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- starting and stopping

def start(parent: int | None = None, idle_s: float = 600.0, wait: bool = True, cwd: str | None = None,
          env: dict | None = None, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start a server in the background. Returns (process, socket path). With wait, return once it listens;
    without, at once: nodes that start before it listens (~5 s of imports) start cold. cwd and env: the
    server's (default: this process's). A child imports the pipeline package anew, from the node's folder."""
    if sys.platform != "linux":
        raise OSError("the fork server needs Linux")
    path = os.path.join(tempfile.mkdtemp(prefix="mim-fork-"), "socket")
    cmd = [sys.executable, "-m", "pipeline.orchestration.forkserver", "serve", path, "--idle", str(idle_s)]
    if parent:
        cmd += ["--parent", str(parent)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd, env=env)
    deadline = time.time() + timeout_s
    while wait and not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            stop(proc, path)
            raise OSError(f"the fork server did not start (exit status {proc.poll()})")
        time.sleep(0.05)
    return proc, path


def stop(proc: subprocess.Popen, path: str) -> None:
    """Stop a server from start(): running children are killed, the socket and its folder removed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _remove(path)
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.orchestration.forkserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command (e.g. dvc repro) with a fork server for its lifetime")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    srv = sub.add_parser("serve", help="(internal) the server itself, as start() runs it")
    srv.add_argument("path")
    srv.add_argument("--parent", type=int)
    srv.add_argument("--idle", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            serve(args.path, args.parent, args.idle)
        except SystemExit:
            pass
        os._exit(0)                                      # no teardown of torch and the rest: ~1.5 s
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("run: give the command to run, e.g. python -m pipeline.orchestration.forkserver run -- dvc repro")
    proc, path = start(parent=os.getpid())
    try:
        return subprocess.call(cmd, env={**os.environ, ENV: path})
    finally:
        stop(proc, path)


if __name__ == "__main__":
    sys.exit(main())
