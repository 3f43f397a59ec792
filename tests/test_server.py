"""server.py against the gunicorn it is written for: the one patch, and the public methods the worker builds on."""

from __future__ import annotations

import inspect

import gunicorn
from gunicorn import util
from gunicorn.workers import base, base_async, ggevent

import server


def test_the_one_patch_still_reaches_gunicorn():
    """gunicorn answers a request it refuses itself through gunicorn.util.write_error, which server.Worker
    replaces (the one patch of gunicorn's internals). If an upgrade renames it, changes its arguments or
    stops calling it, this fails; tests/test_e2e.py::test_requests_the_server_cannot_parse_get_json_errors
    checks the answers themselves."""
    assert gunicorn.__version__ == "27.0.1", "the patch was checked against gunicorn 27.0.1: check it again"
    assert list(inspect.signature(util.write_error).parameters) == ["sock", "status_int", "reason", "mesg"]
    assert list(inspect.signature(server.write_json_error).parameters) == ["sock", "status_int", "reason", "mesg"]
    assert "util.write_error(client, status_int, reason, mesg)" in inspect.getsource(base.Worker.handle_error)


def test_the_worker_overrides_only_public_methods_that_gunicorn_still_calls():
    """handle (each accepted connection), timeout_ctx (the wait for a request's headers), handle_request
    (a request whose headers have arrived) and handle_exit (SIGTERM): public, and called where expected."""
    overridden = {name for name in vars(server.Worker) if callable(vars(server.Worker)[name])}
    assert not {name for name in overridden if name.startswith("_")}
    handle = inspect.getsource(base_async.AsyncWorker.handle)
    assert "with self.timeout_ctx():\n                            req = next(parser)" in handle
    assert "self.handle_request(listener_name, req, client, addr)" in handle
    assert "partial(self.handle, s)" in inspect.getsource(ggevent.GeventWorker.run)
    assert "signal.signal(signal.SIGTERM, self.handle_exit)" in inspect.getsource(base.Worker.init_signals)
    # The quiet end of a wait: gunicorn's own timeout_ctx is a gevent.Timeout that ends the block.
    assert "gevent.Timeout(self.cfg.keepalive, False)" in inspect.getsource(ggevent.GeventWorker.timeout_ctx)
