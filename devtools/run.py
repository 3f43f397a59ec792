"""`make run`: the service on this machine, with a stand-in for Spotify until .env has your app's credentials.

Writes .env from .env.example with a fresh ENCRYPTION_SECRET when there is none (or adds the secret when it is
empty), then starts the Procfile's web command on 127.0.0.1:1234, which reads .env through gunicorn.conf.py.
Without SPOTIFY_CLIENT_ID and SPOTIFY_CLIENT_SECRET it also starts devtools/fake_accounts.py and points the service
at it, the page's /callback on this port allowed; with them it checks them first (`flask --app app check`), and a
failure is the first and the last thing its banner says, and the first the page says. `--host 0.0.0.0` listens on
every interface and prints the URLs a phone on the same network needs.

This process binds the port itself and hands the listening socket to gunicorn, so a port already in use is said
plainly, and the banner is only ever printed for its own server. gunicorn runs in a session of its own: Ctrl-C
reaches this process alone, which asks gunicorn for one graceful stop (a second Ctrl-C: a quick one).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from dotenv import dotenv_values, set_key

import check
from config import Config, generate_secret
from devtools.process import wait_until_up, web_command
from logs import redacted_url

ROOT = Path(__file__).resolve().parent.parent
# Spotify's Ruby demo listens here, and the iOS SDK's demo projects send their swaps and refreshes here.
PORT = 1234


def prepare_env_file(path: Path, example: Path) -> str | None:
    """Make sure .env exists with an ENCRYPTION_SECRET; what was done, or None."""
    if not path.exists():
        text = re.sub(r"^ENCRYPTION_SECRET=[ \t]*$", f"ENCRYPTION_SECRET={generate_secret()}",
                      example.read_text(), count=1, flags=re.M)
        path.touch(mode=0o600)  # it holds secrets
        path.write_text(text)
        return f"Wrote {path.name} from {example.name}, with a fresh ENCRYPTION_SECRET."
    if "ENCRYPTION_SECRET" in os.environ or (dotenv_values(path).get("ENCRYPTION_SECRET") or "").strip():
        return None
    set_key(path, "ENCRYPTION_SECRET", generate_secret(), quote_mode="never")
    return f"Added a fresh ENCRYPTION_SECRET to {path.name}."


def setting(name: str, dotenv: dict[str, str | None]) -> str:
    """A variable as the service will see it: the environment wins over .env, as in gunicorn.conf.py."""
    value = os.environ[name] if name in os.environ else dotenv.get(name)
    return (value or "").strip()


def lan_address() -> str | None:
    """This machine's address on its network, as a phone there would reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # Connecting a UDP socket sends nothing: it only asks the kernel which address would be used.
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def banner(host: str, port: int, stand_in: str | None, lan: str | None, callback_allowed: bool,
           failures: Sequence[str] = (), elsewhere: Sequence[str] = ()) -> str:
    """What the console says once the service answers: a failed check first, and last."""
    local = f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "127.0.0.1") else f"http://{host}:{port}"
    lines = [""]
    if failures:
        lines += ["THE CHECK FAILED. Fix what it names (in .env), then stop (Ctrl-C) and start make run again:",
                  *(f"  {line}" for line in failures),
                  "The service runs meanwhile, and its page says the same.", ""]
    lines += [f"The token swap service is running: open {local} in a browser.",
              f"  Swap URL {local}/swap, refresh URL {local}/refresh"
              + (f" (the iOS SDK's demo projects use http://localhost:{PORT}/swap and /refresh: this server)."
                 if port == PORT else ".")]
    if host == "0.0.0.0":
        if lan:
            lines.append(f"  On every interface. From a phone on this network: swap URL http://{lan}:{port}/swap,"
                         f" refresh URL http://{lan}:{port}/refresh")
        else:
            lines.append(f"  On every interface: from a phone on this network use http://<this machine's address>:"
                         f"{port}/swap and /refresh (the address is in your network settings).")
    if not callback_allowed:
        lines.append(f"  The page's login test needs {local}/callback in SPOTIFY_CLIENT_CALLBACK_URL"
                     " (and, with your own app, in its Redirect URIs in the Spotify dashboard).")
    if stand_in:
        lines += ["", "No Spotify credentials in .env (SPOTIFY_CLIENT_ID, SPOTIFY_CLIENT_SECRET): using a STAND-IN.",
                  stand_in, "Apps logged in with real Spotify cannot swap their codes here. Put your app's"
                  " credentials in .env and run again for the real thing."]
    elif elsewhere:
        lines.append(f"  Not Spotify: the credentials in .env, with {' and '.join(elsewhere)}.")
    elif not failures:
        lines.append("  Using Spotify, with the credentials in .env: it accepts them.")
    if failures:
        lines.append("Stop with Ctrl-C. THE CHECK FAILED (above): change what it names in .env, then make run again.")
    else:
        lines.append("Stop with Ctrl-C.")
    return "\n".join(lines)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket gunicorn will serve on; OSError (EADDRINUSE) when the port is taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As gunicorn does: a port left in TIME_WAIT by the last run is free, one listened on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # gunicorn's default backlog
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def port_in_use(host: str, port: int) -> str:
    """What the console says when the port is taken."""
    return (f"Port {port} is in use on {host}: another `make run`, or another program, listens there.\n"
            f"Stop it, or choose another port: make run PORT={8000 if port != 8000 else 8080}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    parser.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args(argv)

    try:
        listener = listen(args.host, args.port)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        print(port_in_use(args.host, args.port), file=sys.stderr, flush=True)
        return 1

    done = prepare_env_file(ROOT / ".env", ROOT / ".env.example")
    if done:
        print(done, flush=True)
    dotenv = dotenv_values(ROOT / ".env")

    env = {
        **os.environ,
        "PORT": str(args.port),
        # The Procfile binds 0.0.0.0:$PORT; command-line style settings override gunicorn.conf.py's.
        # gunicorn serves the socket bound here (fd://), so nothing can take the port in between.
        "GUNICORN_CMD_ARGS": f"--bind fd://{listener.fileno()}",
        # No load balancer in front to wait for: Ctrl-C begins the stop at once.
        "STOP_DELAY": "0",
        # gunicorn from this virtualenv, even when it is not activated (make runs .venv/bin/python).
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    local = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
    fake = stand_in = None
    failures: list[str] = []
    elsewhere: list[str] = []
    callbacks = setting("SPOTIFY_CLIENT_CALLBACK_URL", dotenv)
    if not (setting("SPOTIFY_CLIENT_ID", dotenv) and setting("SPOTIFY_CLIENT_SECRET", dotenv)):
        from devtools.fake_accounts import CLIENT_ID, CLIENT_SECRET, FakeAccounts, describe

        fake = FakeAccounts(record=False).start()
        stand_in = describe(fake.url)
        env.update(SPOTIFY_CLIENT_ID=CLIENT_ID, SPOTIFY_CLIENT_SECRET=CLIENT_SECRET,
                   SPOTIFY_ACCOUNTS_URL=fake.url, SPOTIFY_API_URL=fake.url,
                   TOKENSWAP_CREDENTIALS_CHECKED="stand-in")
        # The stand-in takes any redirect URI: the page's login test works on whichever port this is.
        if f"{local}/callback" not in [uri.strip() for uri in callbacks.split(",")]:
            callbacks = env["SPOTIFY_CLIENT_CALLBACK_URL"] = ",".join(filter(None, [callbacks, f"{local}/callback"]))
    else:
        # Real credentials: ask Spotify before serving (what `flask --app app check` does), say what it found,
        # and tell the page (TOKENSWAP_CREDENTIALS_CHECKED, TOKENSWAP_CHECK_FAILED). A failed check is said
        # first and last, and the service still starts.
        print("Checking this deployment before serving (.venv/bin/flask --app app check):", flush=True)
        variables = {**{name: value for name, value in dotenv.items() if value is not None}, **os.environ}

        def echo(line: str) -> None:
            print("  " + line, flush=True)
            if line.startswith(check.FAIL):
                failures.append(line[len(check.FAIL):].strip())

        passed = check.report(variables, echo)
        env["TOKENSWAP_CREDENTIALS_CHECKED"] = "accepted" if passed else "failed"
        env["TOKENSWAP_CHECK_FAILED"] = "\n".join(failures)
        for name, spotify in (("SPOTIFY_ACCOUNTS_URL", Config.accounts_url), ("SPOTIFY_API_URL", Config.api_url)):
            value = setting(name, dotenv)
            if value and value.rstrip("/") != spotify:
                elsewhere.append(f"{name}={redacted_url(value)}")

    # A session of its own: a terminal's Ctrl-C (SIGINT to its whole foreground process group) would
    # otherwise reach the master and each worker at once, and a worker stopped both by the terminal and
    # by its master prints a traceback. Only this process gets it, and passes one stop on.
    server = subprocess.Popen(shlex.split(web_command()), cwd=ROOT, env=env, pass_fds=[listener.fileno()],
                              start_new_session=True)
    listener.close()  # gunicorn holds it now
    stops = 0

    def stop(signum: int, frame: object) -> None:
        # The first Ctrl-C or SIGTERM: gunicorn's graceful stop (for 3 s answers close their connections, then
        # the idle ones close; requests finish); another Ctrl-C: its quick stop.
        nonlocal stops
        stops += 1
        if server.poll() is None:
            server.send_signal(signal.SIGTERM if stops == 1 or signum == signal.SIGTERM else signal.SIGINT)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if wait_until_up(local, server, timeout=60) and not stops:
            print(banner(args.host, args.port, stand_in, lan_address() if args.host == "0.0.0.0" else None,
                         f"{local}/callback" in [uri.strip() for uri in callbacks.split(",")], failures, elsewhere), flush=True)
        code = server.wait()
        # Stopped as asked: a clean end for make, not "Error 1".
        return 0 if stops and code == 0 else code
    finally:
        if server.poll() is None:  # this process ends for another reason: do not leave gunicorn behind
            server.kill()
            server.wait()
        if fake:
            fake.stop()


if __name__ == "__main__":
    sys.exit(main())
