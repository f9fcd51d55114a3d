"""The ``charnn`` command line: serve, train and use models locally, or drive a server.

    charnn serve [--host --port --data-dir --workers N --reload]
    charnn worker [--concurrency N --loglevel info]   (with CHARNN_BROKER_URL, CHARNN_DATABASE_URL)
    charnn check DATA_DIR [--repair]
    charnn train CORPUS.txt|--example --out model.npz [--fit --hidden-size ... --patience ...]
    charnn sample|predict|score model.npz ...      (TEXT, @FILE or -f FILE)
    charnn export model.npz --web DIR              (the model, charnn.js and a page)
    charnn remote train|jobs|pause|resume|cancel|predict|generate|score|models|download|upload
        ... [--url URL]

Every failure a user can cause (a missing file, a bad flag value, an unreachable
or refusing server) ends as one ``charnn: error: ...`` line and exit status 1
(2 for command-line usage errors, as argparse does), never a traceback.
Imports are deferred to the command that needs them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from model.config import SERVED, TrainConfig

from .domain import DEFAULT_URL


class CliError(Exception):
    """A problem to report as one line, not a traceback."""


# --------------------------------------------------------------------------- helpers


def _flag(name: str) -> str:
    return "--time-limit" if name == "time_limit_s" else "--" + name.replace("_", "-")


def _add_hyperparameters(p: argparse.ArgumentParser) -> None:
    """The flags of the hyperparameters the HTTP API takes (model/config.py: SERVED)."""
    g = p.add_argument_group("hyperparameters (omitted: the measured defaults)")
    for h in SERVED:
        nullable = h.default is None or h.name in NULLABLE
        g.add_argument(
            _flag(h.name),
            dest=h.name,
            type=_nullable(h.kind) if nullable else h.kind,
            default=argparse.SUPPRESS,
            metavar=h.name.split("_")[0].upper() if h.kind is not str else None,
            help=f"{h.help.replace('%', '%%')} (default {h.default}"
            + ("; 'none' turns it off)" if nullable else ")"),
        )
    g.add_argument("--seed", type=int, default=None, help="random seed (default 0)")


# Hyperparameters that may be null ("none" on the command line), default or not.
NULLABLE = frozenset({"max_steps", "time_limit_s", "patience"})


def _nullable(kind: type[int] | type[float] | type[str]) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "off") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    given = vars(args)
    return {h.name: given[h.name] for h in SERVED if h.name in given}


def _read_text(path: str) -> str:
    """A UTF-8 file, or standard input for '-'."""
    try:  # bytes, then decode: text mode would turn "\r\n" into "\n" (no normalisation)
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None


def _add_corpus(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="?", help="UTF-8 text file ('-': standard input)")
    p.add_argument(
        "--example",
        action="store_true",
        help="train on the shipped sample text (the opening of Hamlet, ~100k characters)",
    )
    p.add_argument(
        "--fit",
        action="store_true",
        help="size the model and the run to the text (as the demo page does); flags given "
        "still win",
    )


def _corpus(args: argparse.Namespace) -> str:
    if args.example and args.corpus is not None:
        raise CliError("give a corpus file or --example, not both")
    if not args.example and args.corpus is None:
        raise CliError("no corpus: give a UTF-8 text file ('-': standard input) or --example")
    if args.example:
        from model.sample import sample_text

        return sample_text()
    return _read_text(args.corpus)


def _corpus_name(args: argparse.Namespace) -> str | None:
    from model.sample import SAMPLE_NAME

    if args.example:
        return SAMPLE_NAME
    return Path(args.corpus).stem if args.corpus != "-" else None


def _fitted(args: argparse.Namespace, text: str) -> dict[str, Any]:
    if not args.fit:
        return {}
    from model.presets import for_corpus

    suggestion = for_corpus(len(text))
    print(f"charnn: {suggestion.reason}", file=sys.stderr)
    return dict(suggestion.hyperparameters)


def _add_text(p: argparse.ArgumentParser, what: str) -> None:
    """TEXT as an argument, or from a file: ``-f FILE`` or ``@FILE`` (curl's convention)."""
    p.add_argument("text", nargs="?", help=f"{what}; @FILE reads it from a file, '-' from stdin")
    p.add_argument("-f", "--file", help="read the text from a UTF-8 file ('-': standard input)")


def _text(args: argparse.Namespace, *, required: bool = True) -> str:
    if args.file is not None and args.text is not None:
        raise CliError("give the text or -f FILE, not both")
    if args.file is not None:
        return _read_text(args.file)
    if args.text is None:
        if required:
            raise CliError("no text: give it as an argument, @FILE, or -f FILE ('-': stdin)")
        return ""
    if args.text == "-":
        return _read_text("-")
    if args.text.startswith("@") and len(args.text) > 1:
        return _read_text(args.text[1:])
    if len(args.text) < 256 and Path(args.text).is_file():  # the old `score MODEL FILE`
        print(
            f"charnn: note: {args.text!r} is taken as the text itself; "
            f"to read the file, use @{args.text} or -f {args.text}",
            file=sys.stderr,
        )
    return str(args.text)


def _show(ch: str) -> str:
    """A character as it should appear in a table: whitespace made visible."""
    return {" ": "␠", "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(
        ch, ch if ch.isprintable() else repr(ch)
    )


def _print_distribution(nxt: Sequence[tuple[str, float]], entropy: float) -> None:
    for ch, p in nxt:
        bar = "█" * round(p * 40)
        print(f"{_show(ch):>4s}  {p:7.4f}  {bar}")
    print(f"entropy {entropy:.3f} bits")


def _progress_bar(total: int | None, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


def _postfix(
    train_loss: float | None,
    val_loss: float | None,
    cps: float | None,
    grad_norm: float | None = None,
    lr: float | None = None,
    clipped: bool | None = None,
) -> str:
    """The bar's one line: losses, speed, and the step's gradient norm (a "*" when it was
    clipped) and learning rate, as char-rnn printed them."""
    parts = []
    if train_loss is not None:
        parts.append(f"loss {train_loss:.3f}")
    if val_loss is not None:
        parts.append(f"val {val_loss:.3f}")
    if cps:
        parts.append(f"{cps / 1000:.0f}k chars/s")
    if grad_norm is not None:
        parts.append(f"|g| {grad_norm:.3g}{'*' if clipped else ''}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- local commands


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .store.sqlite import OWNER_ENV

    os.environ.pop(OWNER_ENV, None)  # only ever set below, for this server's own workers
    if args.data_dir is not None:
        os.environ["CHARNN_DATA_DIR"] = str(args.data_dir)
    if args.workers is not None:
        os.environ["CHARNN_WORKERS"] = str(args.workers)
    settings = _settings()
    workers = settings.workers
    if workers > 1 and args.reload:
        raise CliError("--reload runs one process: drop --workers (or CHARNN_WORKERS) with it")
    if workers > 1 and not settings.distributed and not sys.platform.startswith("linux"):
        raise CliError("--workers above 1 needs Linux (its processes talk over Unix sockets)")
    _check_port(args.host, args.port)  # before the data directory is made or opened
    lock = _preflight(settings, keep_lock=workers > 1)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    where = _where(settings) + (f", {workers} worker processes" if workers > 1 else "")
    banner = (
        f"serving on http://{args.host}:{args.port} ({where}); "
        f"open http://{host}:{args.port}/ in a browser"
    )
    if settings.log_format == "json":  # every line of the log one JSON object
        import logging

        from .logs import JsonFormatter

        record = logging.LogRecord("charnn", logging.INFO, __file__, 0, banner, None, None)
        banner = JsonFormatter().format(record)
    else:
        banner = f"charnn: {banner}"
    print(banner, file=sys.stderr, flush=True)
    from .logs import log_config

    options: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "log_config": log_config(settings.log_format, args.log_level),
        "access_log": False,  # charnn.access writes them, with each request's id and route
        "http": "app.api.http_protocol:HeaderTimeoutProtocol",
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        # Typing sessions' answers are a few hundred bytes: compressing each cost ~9 % of
        # the server's time per keystroke (py-spy) to save little on a LAN.
        "ws_per_message_deflate": False,
    }
    if workers > 1:
        if lock is not None:  # the embedded store: the workers trust this process's lock
            os.environ[OWNER_ENV] = str(os.getpid())
        try:
            _serve_workers(options, workers, lock)
        finally:
            if lock is not None:
                os.close(lock)
        return 0

    def stopped(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal under
    # the handlers it found: with these, a requested stop exits 0 (what process
    # managers and `docker stop` call clean), not 143 or a KeyboardInterrupt.
    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    # workers=1 said: uvicorn would otherwise take $WEB_CONCURRENCY (CHARNN_WORKERS decides)
    uvicorn.run("app.main:app", reload=args.reload, workers=1, **options)
    return 0


def _serve_workers(options: dict[str, Any], workers: int, lock: int | None) -> None:
    """N uvicorn workers on one socket, under uvicorn's supervisor (0.30+: a worker that
    dies is replaced; SIGTERM/SIGINT stop them all, each as one server stops).

    Two additions: the first stop signal is written in the data directory's lock
    before the workers are told (no worker takes over the jobs of a runner that
    stopped: app/jobs/role.py), and a worker that could not start (the supervisor
    then stops the rest) is exit status 1 with a line, not a clean exit."""
    import uvicorn
    from uvicorn.supervisors.multiprocess import Multiprocess

    from .store.sqlite import mark_stopping

    class Supervisor(Multiprocess):
        asked_to_stop = False

        def _stopping(self) -> None:
            if not self.asked_to_stop and lock is not None:
                mark_stopping(lock)
            self.asked_to_stop = True

        def handle_int(self) -> None:
            self._stopping()
            super().handle_int()

        def handle_term(self) -> None:
            self._stopping()
            super().handle_term()

    config = uvicorn.Config("app.main:app", workers=workers, **options)
    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    if not supervisor.asked_to_stop:
        raise CliError("a worker process could not start (the reason is logged above)")


def _port(text: str) -> int:
    """A TCP port for argparse: 1-65535 (the kernel would wrap 73686 to 8150)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range: use 1-65535")
    return port


def _workers(text: str) -> int:
    """A worker count for argparse, within CHARNN_WORKERS's bounds."""
    from .settings import MAX_WORKERS

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes") from None
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{n} workers is out of range: use 1-{MAX_WORKERS}")
    return n


def _bind(host: str, port: int) -> None:
    """Bind and release ``host:port`` the way uvicorn will (SO_REUSEADDR), or raise OSError."""
    import socket

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)


def _check_port(host: str, port: int) -> None:
    """One line for a port that cannot be listened on, naming a free one to try."""
    import errno
    import socket

    try:
        _bind(host, port)
    except socket.gaierror:
        raise CliError(f"cannot listen on {host!r}: not an address or known host name") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            hint = next(
                (f"; try --port {p}" for p in range(port + 1, port + 50) if _free(host, p)), ""
            )
            raise CliError(
                f"port {port} on {host} is already in use (another server?){hint}"
            ) from None
        if e.errno == errno.EACCES:
            raise CliError(
                f"not allowed to listen on port {port} (below 1024 needs privileges); "
                "try --port 8000"
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise CliError(f"cannot listen on {host}: not an address of this machine") from None
        raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _free(host: str, port: int) -> bool:
    if port > 65535:
        return False
    try:
        _bind(host, port)
    except OSError:
        return False
    return True


def _preflight(settings: Any, *, keep_lock: bool = False) -> int | None:
    """Open the data directory once before serving: one clear line (in use by another
    server, damaged, not writable) instead of a failed start-up's traceback. With
    ``keep_lock`` (``--workers N``) this process keeps the directory locked while its
    workers serve it: the lock's descriptor."""
    if settings.distributed:
        return None
    from .store.base import StoreError
    from .store.sqlite import SqliteStore

    try:
        store = SqliteStore(settings.data_dir)
    except StoreError as e:
        raise CliError(str(e)) from None
    if keep_lock:
        return store.detach_lock()
    store.close()
    return None


def _settings() -> Any:
    """The service settings from the environment, or one line saying what is wrong."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from .settings import Settings

    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"CHARNN_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}"
            if err["loc"]
            else str(err["msg"]).removeprefix("Value error, ")
            for err in e.errors()
        )
        raise CliError(f"bad settings: {problems}") from None
    except SettingsError as e:  # a value that is not even parseable, e.g. malformed JSON
        raise CliError(f"bad settings: {e}") from None


def _where(settings: Any) -> str:
    """Where the service keeps its data, for the banner (never a URL's password)."""
    if not settings.distributed:
        return f"data in {settings.data_dir}"
    from urllib.parse import urlsplit

    db = urlsplit(settings.database_url)
    return f"data in PostgreSQL {db.hostname}{db.path}, jobs on Celery workers"


def cmd_worker(args: argparse.Namespace) -> int:
    """A Celery worker (app/jobs/tasks.py): trains the jobs that API replicas queue."""
    import socket

    if args.concurrency is not None:
        os.environ["CHARNN_WORKER_CONCURRENCY"] = str(args.concurrency)
    settings = _settings()
    if not settings.distributed:
        raise CliError(
            "a worker needs CHARNN_BROKER_URL (Redis) and CHARNN_DATABASE_URL (PostgreSQL); "
            "without them `charnn serve` runs jobs itself"
        )
    if settings.worker_metrics_port is not None:
        _serve_worker_metrics(settings)
    from .jobs.tasks import worker_app

    celery_app = worker_app(settings)

    # A distinct node name per process: two workers on one host must not collide.
    name = args.name or f"charnn-{os.getpid()}@{socket.gethostname()}"
    print(
        f"charnn: worker {name} running up to {settings.worker_concurrency} job(s) at once",
        file=sys.stderr,
        flush=True,
    )
    argv = ["worker", f"--loglevel={args.loglevel}", f"--hostname={name}"]
    argv += [f"--concurrency={settings.worker_concurrency}", "--without-mingle"]
    argv += ["--without-gossip"]
    celery_app.worker_main(argv)
    return 0


def _serve_worker_metrics(settings: Any) -> None:
    """/metrics of this worker and its pool processes, on ``worker_metrics_port``.

    Training runs in Celery's pool processes, each with its own counters: in
    prometheus-client's multiprocess mode they write them to files in a directory of
    this worker's, and the main process adds them up when scraped. The mode must be
    chosen before prometheus-client is first imported, here, before the pool forks.
    """
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="charnn-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from .metrics import JOBS, job_gauges
    from .store.postgres import PostgresStore

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    store = PostgresStore(settings.database_url)
    JOBS.read = lambda: job_gauges(store)
    registry.register(JOBS)
    try:
        start_http_server(settings.worker_metrics_port, registry=registry)
    except OSError as e:
        raise CliError(
            f"cannot serve worker metrics on port {settings.worker_metrics_port}: {e.strerror or e}"
        ) from None
    print(
        f"charnn: worker metrics on http://0.0.0.0:{settings.worker_metrics_port}/metrics",
        file=sys.stderr,
        flush=True,
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Check a data directory (and with --repair mend it); exit 1 if problems remain."""
    from .store.check import check_data_dir

    report = check_data_dir(Path(args.data_dir), repair=args.repair)
    for line in report.lines:
        print(line)
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from model.checkpoint import from_result, save_model
    from model.params import flat_size
    from model.train import Trainer

    text = _corpus(args)
    overrides = {**_fitted(args, text), **_hyperparameters(args)}
    if args.seed is not None:
        overrides["seed"] = args.seed
    config = TrainConfig.from_dict(overrides)  # ConfigError -> one line
    out = Path(args.out)
    if not out.parent.is_dir():
        raise CliError(f"cannot write {out}: {out.parent} is not a directory")
    trainer = Trainer(text, config)
    stop = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True  # finish the step, then save the best model so far

    previous = signal.signal(signal.SIGINT, interrupt)
    bar = _progress_bar(config.max_steps, "training") if not args.quiet else None
    val: float | None = None
    try:
        for event in trainer.run(lambda: stop):
            val = event.val_loss if event.val_loss is not None else val
            if bar is not None:
                bar.update(event.step - bar.n)
                bar.set_postfix_str(
                    _postfix(
                        event.train_loss,
                        val,
                        event.chars_per_sec,
                        event.grad_norm,
                        event.learning_rate,
                        event.clipped,
                    )
                )
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    result = trainer.result()
    save_model(out, from_result(result, extra={"name": out.stem}))
    m = result.metrics
    n_params = flat_size(result.params.n_a, result.params.n_x)
    why = trainer.state.stop_reason
    how = {
        "stopped": "interrupted",
        "early_stopping": "stopped early (validation loss no longer improving)",
        "time_limit": "time limit reached",
    }.get(why or "", "done")
    print(
        f"{how} after {m['steps']} steps ({trainer.state.elapsed_s:.1f} s): train loss "
        f"{m['train_loss']:.4f}, best val loss {_fmt(m.get('val_loss'))} nats/char at step "
        f"{m['best_step']} (the model kept); {n_params:,} parameters, {len(result.vocab)} "
        f"characters -> {out}"
    )
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _load(path: str) -> Any:
    from model.checkpoint import load_model

    try:
        return load_model(path)
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None


def cmd_sample(args: argparse.Namespace) -> int:
    from model.inference import iter_sample

    ckpt = _load(args.model)
    stream = iter_sample(
        ckpt.params,
        ckpt.vocab,
        args.prompt,
        max_chars=args.length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or (),
    )
    sys.stdout.write(args.prompt)
    for ch in stream:
        sys.stdout.write(ch)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from model.inference import advance, entropy_bits, initial_state, next_distribution

    ckpt = _load(args.model)
    p, vocab = ckpt.params, ckpt.vocab
    text = _text(args, required=False)
    probs = next_distribution(p, advance(p, initial_state(p), vocab.encode(text)), args.temperature)
    order = sorted(range(len(probs)), key=lambda i: -probs[i])[: args.top_k]
    nxt = [(vocab.chars[i], float(probs[i])) for i in order]
    if args.json:
        print(
            json.dumps(
                {
                    "text": text,
                    "next": [{"char": c, "prob": q} for c, q in nxt],
                    "entropy_bits": entropy_bits(probs),
                }
            )
        )
    else:
        _print_distribution(nxt, entropy_bits(probs))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A folder any static host can serve: the weights, charnn.js and a page using them."""
    from pathlib import Path

    from model.atomic import atomic_write_bytes
    from model.web import FILE_NAME, web_bytes

    ckpt = _load(args.model)
    out = Path(args.web)
    here = Path(__file__).resolve().parent
    extra = {k: str(v) for k, v in ckpt.extra.items() if k in ("name", "created_at")}
    files = {
        FILE_NAME: web_bytes(ckpt, extra),
        "charnn.js": (here / "static" / "charnn.js").read_bytes(),
        "index.html": (here / "export" / "index.html").read_bytes(),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            atomic_write_bytes(out / name, data)
    except OSError as e:
        raise CliError(f"cannot write {out}: {e.strerror or e}") from None
    size = len(files[FILE_NAME])
    print(
        f"wrote {out}/{{{', '.join(files)}}} ({size:,} bytes of weights); serve the folder "
        f"with any static file server, e.g. python -m http.server -d {out}"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from model.inference import score, score_summary

    ckpt = _load(args.model)
    text = _text(args)
    s = score_summary(score(ckpt.params, ckpt.vocab.encode(text)))
    print(
        f"{s.chars} characters: {s.mean_nats:.4f} nats/char, {s.bits_per_char:.4f} bits/char, "
        f"perplexity {s.perplexity:.3f}"
    )
    return 0


# --------------------------------------------------------------------------- remote commands


def _client(args: argparse.Namespace) -> Any:
    from .client import Client

    return Client(args.url, api_key=args.api_key)


def cmd_remote_train(args: argparse.Namespace) -> int:
    from .client import JobEvent

    text = _corpus(args)
    name = args.name or _corpus_name(args)
    hp = {**_fitted(args, text), **_hyperparameters(args)}
    with _client(args) as client:
        # A key (given, else the client's uuid4): its own retry never starts a second job.
        key = args.idempotency_key
        job = client.train(text, name=name, seed=args.seed, idempotency_key=key, **hp)
        print(f"job {job.id} queued", file=sys.stderr)
        if not args.wait:
            print(job.id)
            return 0
        total = hp.get("max_steps", TrainConfig().max_steps)
        bar = _progress_bar(total, "training") if not args.quiet else None
        val: float | None = None

        def progress(event: JobEvent) -> None:
            nonlocal val
            if bar is None or event.step is None:
                return
            if event.total_steps is not None and bar.total != event.total_steps:
                bar.total = event.total_steps  # the server's word (e.g. a resumed job)
            data = event.data
            val = data.get("val_loss") or val
            bar.update(event.step - bar.n)
            bar.set_postfix_str(_postfix(data.get("train_loss"), val, data.get("chars_per_sec")))

        try:
            done = job.wait(progress=progress)
        finally:
            if bar is not None:
                bar.close()
        note = f" ({done.note})" if done.note else ""
        print(f"job {done.id} succeeded: model {done.model_id}{note}", file=sys.stderr)
        print(done.model_id)
    return 0


def cmd_remote_predict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.predict(
            _text(args, required=False),
            model=args.model,
            top_k=args.top_k,
            temperature=args.temperature,
        )
    if args.json:
        print(out.model_dump_json())
    else:
        _print_distribution([(n.char, n.prob) for n in out.next], out.entropy_bits)
    return 0


def cmd_remote_generate(args: argparse.Namespace) -> int:
    kwargs = {
        "model": args.model,
        "max_chars": args.length,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop or (),
    }
    with _client(args) as client:
        sys.stdout.write(args.prompt)
        for piece in client.stream_generate(args.prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_remote_score(args: argparse.Namespace) -> int:
    text = _text(args)
    with _client(args) as client:
        s = client.score(text, model=args.model)
    print(
        f"{s.chars} characters: {s.mean_nats:.4f} nats/char, {s.bits_per_char:.4f} bits/char, "
        f"perplexity {s.perplexity:.3f} (model {s.model})"
    )
    return 0


def cmd_remote_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.models(limit=args.limit)
    if args.json:
        print(page.model_dump_json())
        return 0
    print(f"{'id':32s}  {'name':20s} {'hidden':>6s} {'val loss':>8s}  created")
    from datetime import datetime

    for m in page.items:
        created = datetime.fromtimestamp(m.created_at).strftime("%Y-%m-%d %H:%M")
        print(f"{m.id:32s}  {m.name[:20]:20s} {m.hidden_size:6d} {_fmt(m.val_loss):>8s}  {created}")
    print(f"({len(page.items)} of {page.total})")
    return 0


def cmd_remote_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.jobs(limit=args.limit)
    if args.json:
        print(page.model_dump_json())
        return 0
    for j in page.items:
        print(f"{j.id}  {j.status:9s}  step {j.progress.step:>7d}  {j.name}")
    return 0


def cmd_remote_steer(args: argparse.Namespace) -> int:
    """``remote pause|resume|cancel JOB``: one line saying where the job is now."""
    with _client(args) as client:
        job = getattr(client.job(args.job), args.remote_command)()
    if args.json:
        print(job.model_dump_json())
        return 0
    doing = {"pause": "pausing", "cancel": "cancelling"}.get(args.remote_command)
    if job.status == "running" and doing:  # the server's 202: still stopping
        print(f"{job.id}  {doing} at step {job.progress.step} (stops at its next step)")
    else:
        print(f"{job.id}  {job.status} at step {job.progress.step}")
    return 0


def cmd_remote_download(args: argparse.Namespace) -> int:
    import re

    out = Path(args.out or re.sub(r"[^\w.-]", "_", args.model) + ".npz")
    with _client(args) as client:
        data = client.download(args.model)
    from model.atomic import atomic_write_bytes

    atomic_write_bytes(out, data)
    print(f"{len(data):,} bytes -> {out}", file=sys.stderr)
    return 0


def cmd_remote_upload(args: argparse.Namespace) -> int:
    try:
        data = Path(args.file).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {args.file}: {e.strerror or e}") from None
    with _client(args) as client:
        m = client.upload(data, name=args.name)
    print(m.id)
    return 0


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """A (sub)command's parser: no abbreviated options, and it knows itself, so that an
    unknown option is reported with this command's usage, not the top level's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.set_defaults(parser=self)


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--length", type=int, default=200, help="characters to generate (default 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")


def _remote_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("CHARNN_URL", DEFAULT_URL),
        help=f"the server (default $CHARNN_URL or {DEFAULT_URL})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("CHARNN_API_KEY") or None,
        help="API key for servers that need one (default $CHARNN_API_KEY)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charnn",
        description="Train character-level RNN language models in numpy and serve them.",
        allow_abbrev=False,  # `--hidden 16` must not quietly mean --hidden-size
    )
    parser.set_defaults(parser=parser)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p = sub.add_parser("serve", help="run the HTTP service (API, docs and demo page)")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface (0.0.0.0: all; default 127.0.0.1)"
    )
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default 8000)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="store (default $CHARNN_DATA_DIR or ./charnn-data)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N",
        help="API processes on one port, all serving every route; one of them runs the "
        "training jobs (default $CHARNN_WORKERS or 1)",
    )
    p.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker",
        help="run training jobs for API servers (needs CHARNN_BROKER_URL, CHARNN_DATABASE_URL)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="jobs at once (default $CHARNN_WORKER_CONCURRENCY or 1)",
    )
    p.add_argument(
        "--loglevel", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.add_argument("--name", help="Celery node name (default charnn-<pid>@<host>)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "check", help="check a data directory: database, rows against files (--repair mends)"
    )
    p.add_argument("data_dir", help="the server's data directory (e.g. ./charnn-data)")
    p.add_argument(
        "--repair",
        action="store_true",
        help="mend what can be mended (stop the server first): rebuild a lost or damaged "
        "database's model list from the model files, drop rows whose files are gone",
    )
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train a model on a text file, locally (no server)")
    _add_corpus(p)
    p.add_argument("--out", required=True, help="where to write the model (.npz)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_hyperparameters(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate text from a model file")
    p.add_argument("model", help="model file (.npz)")
    _sampling_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("predict", help="next-character probabilities after a text")
    p.add_argument("model", help="model file (.npz)")
    _add_text(p, "the prefix (omitted or '': the empty one)")
    p.add_argument("--top-k", type=int, default=10, help="how many to show (default 10)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("score", help="bits per character of a text under a model")
    p.add_argument("model", help="model file (.npz)")
    _add_text(p, "the text to score")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser(
        "export", help="write a model for the browser: weights, charnn.js and a page"
    )
    p.add_argument("model", help="model file (.npz)")
    p.add_argument(
        "--web",
        required=True,
        metavar="DIR",
        help="folder to write model.safetensors, charnn.js and index.html into",
    )
    p.set_defaults(func=cmd_export)

    remote = sub.add_parser("remote", help="the same against a running server")
    rsub = remote.add_subparsers(
        dest="remote_command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p = rsub.add_parser("train", help="start a training job on the server")
    _add_corpus(p)
    p.add_argument("--name", help="model name (default: the file name)")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="the same KEY and corpus answer the first job instead of a second (24 h); "
        "default: a new key per command, resent by its own retry",
    )
    _add_hyperparameters(p)
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_train)

    p = rsub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print JSON")
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_jobs)

    for command, what in (
        ("pause", "checkpoint a job at its next step and free its slot"),
        ("resume", "queue a paused job again; it continues exactly where it paused"),
        ("cancel", "stop a queued, running or paused job for good"),
    ):
        p = rsub.add_parser(command, help=what)
        p.add_argument("job", metavar="JOB", help="the job's id")
        p.add_argument("--json", action="store_true", help="print the job as JSON")
        _remote_flags(p)
        p.set_defaults(func=cmd_remote_steer)

    p = rsub.add_parser("predict", help="next-character probabilities after a text")
    _add_text(p, "the prefix (omitted or '': the empty one)")
    p.add_argument("--model", help="id or name (default: the newest model)")
    p.add_argument("--top-k", type=int, default=10, help="how many to show (default 10)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="print JSON")
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_predict)

    p = rsub.add_parser("generate", help="generate text, streamed as it is sampled")
    p.add_argument("--model", help="id or name (default: the newest model)")
    _sampling_flags(p)
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_generate)

    p = rsub.add_parser("score", help="bits per character of a text")
    _add_text(p, "the text to score")
    p.add_argument("--model", help="id or name (default: the newest model)")
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_score)

    p = rsub.add_parser("models", help="list models, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="print JSON")
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_models)

    p = rsub.add_parser("download", help="save a model's checkpoint (.npz)")
    p.add_argument("model", help="id or name (a name: the newest model with it)")
    p.add_argument("--out", help="file to write (default: <model>.npz)")
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_download)

    p = rsub.add_parser("upload", help="upload a checkpoint (.npz) as a new model")
    p.add_argument("file")
    p.add_argument("--name", help="model name (default: from the file's metadata)")
    _remote_flags(p)
    p.set_defaults(func=cmd_remote_upload)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # argparse would blame the top level; the command that was typed says more
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from model.errors import ModelError

    from .client import ApiError

    try:
        code: int = args.func(args)
        return code
    except (CliError, ModelError, ApiError, ValueError) as e:
        print(f"charnn: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("charnn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `charnn sample ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
