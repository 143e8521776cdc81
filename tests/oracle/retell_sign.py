#!/usr/bin/env python3
"""Sign webhook bodies with Retell's own Python SDK, as a reference for callseal's tests.

Usage: RETELL_API_KEY=... retell_sign.py [--timestamp MS] BODY_FILE...

For each file, in order, prints one `x-retell-signature` header value on its own line, as made by
`retell.lib.webhook_auth.symmetric["sign"]` of the `retell-sdk` package: HMAC-SHA256 keyed with the
API key over the body text followed by the decimal timestamp in milliseconds. The SDK signs text, so
each file must be UTF-8; its bytes are decoded without any change, so the signature covers exactly
the bytes of the file. Without --timestamp the SDK takes the current time.

The key comes from the RETELL_API_KEY environment variable rather than an argument, so it does not
show in process listings. Exit status is 0 on success and 2 on invalid arguments, a missing key or a
body that is not UTF-8; a failure prints one line to stderr.
"""

import argparse
import os
import sys

from retell.lib.webhook_auth import symmetric

KEY_VARIABLE = "RETELL_API_KEY"


class SignerError(Exception):
    """An invalid argument, key or body file, reported as one line on stderr."""


def read_body(path):
    """Read a body file and return it as text, rejecting bytes that are not UTF-8."""
    try:
        with open(path, "rb") as body_file:
            body = body_file.read()
    except OSError as error:
        raise SignerError(f"cannot read body file {path}: {error.strerror}") from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SignerError(f"invalid body file {path}: not UTF-8 at byte {error.start}") from None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timestamp", type=int, help="signature timestamp in Unix milliseconds")
    parser.add_argument("bodies", nargs="+", metavar="BODY_FILE")
    arguments = parser.parse_args()

    try:
        key = os.environ.get(KEY_VARIABLE, "")
        if not key:
            raise SignerError(f"missing {KEY_VARIABLE}: set it to the Retell API key")
        headers = [symmetric["sign"](read_body(path), key, arguments.timestamp) for path in arguments.bodies]
    except SignerError as error:
        print(f"retell_sign: {error}", file=sys.stderr)
        return 2

    for header in headers:
        print(header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
