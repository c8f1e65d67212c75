"""moto's server with every request applied one at a time.

moto applies a TransactWriteItems item by item and undoes a cancelled one by putting back a
copy of the tables taken when it began. With requests served concurrently (moto_server's
default), that copy can erase writes another request committed in the meantime, and the
stream shard the copy replaces keeps the cancelled writes as records. DynamoDB transactions
are serialisable and cancelled ones leave no stream records; serving requests one at a time
makes moto behave that way too. Connections are still accepted in parallel (threads), so
keep-alive clients don't starve each other; only the application call is serialised.
"""

import argparse
import signal
import sys
import threading

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)


class Serialised:
    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            # moto's responses are complete lists, so materialising inside the lock is cheap.
            return list(self.app(environ, start_response))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        args.host,
        args.port,
        Serialised(app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
