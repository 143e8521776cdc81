#!/usr/bin/env python3
"""Encrypt and decrypt with AWS's Python Encryption SDK, as a reference for callseal's tests.

Messages use format v2, algorithm suite 0x0478 (AES_256_GCM_HKDF_SHA512_COMMIT_KEY, no signature),
framed, with data keys wrapped in the Raw AES keyring layout: the provider id is the key namespace
(`callseal` unless --namespace sets another), the provider info starts with the key name, and the
wrapping key is 32 raw bytes read from a key file.

With --kms-key-arn instead of key files, data keys are wrapped by AWS KMS keys through the SDK's
StrictAwsKmsMasterKeyProvider (provider id `aws-kms`, provider info the key ARN), which calls
GenerateDataKey and Decrypt with the message's encryption context. --kms-endpoint-url points those
calls at a KMS emulator. Credentials and other settings come from botocore's usual sources.

The SDK's older RawMasterKeyProvider writes and reads the same bytes as its Raw AES keyring, which
would need the optional MPL package. Its defaults (suite 0x0578, frame length 4096) differ from
callseal's, so the suite is fixed here and the frame length is a required option. Decryption
rejects signed suites and, unlike the SDK, any bytes after the final frame.

Exit status is 0 on success, 1 when encryption or decryption fails, and 2 on invalid arguments or
key files. A failure prints one line to stderr and removes the output file, if one was named, so no
partial output is left behind. The SDK's stream API processes one frame at a time, so inputs of tens
of MiB work without holding them in memory.
"""

import argparse
import contextlib
import json
import logging
import os
import struct
import sys

import aws_encryption_sdk
from aws_encryption_sdk.identifiers import (
    Algorithm,
    CommitmentPolicy,
    EncryptionKeyType,
    WrappingAlgorithm,
)
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider

DEFAULT_NAMESPACE = "callseal"
SUITE = Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY
WRAPPING_KEY_LENGTH = 32

# The Raw AES keyring's provider info is: key name, u32 tag length in bits (128), u32 IV length
# (12), then the 12-byte IV. The suffix after the key name is therefore 20 bytes long.
RAW_AES_INFO_SUFFIX = struct.Struct(">II12s")
RAW_AES_TAG_BITS = 128
RAW_AES_IV_LENGTH = 12

COPY_CHUNK = 1 << 20


class OracleError(Exception):
    """An invalid argument or key file, reported as one line on stderr."""


class TrailingDataError(Exception):
    """Bytes follow the final frame of a message that the SDK itself accepted."""


def read_wrapping_key(path):
    """Read a 32-byte wrapping key file and return its bytes."""
    try:
        with open(path, "rb") as key_file:
            key = key_file.read()
    except OSError as error:
        raise OracleError(f"cannot read key file {path}: {error.strerror}") from None
    if len(key) != WRAPPING_KEY_LENGTH:
        raise OracleError(f"invalid key file {path}: expected {WRAPPING_KEY_LENGTH} bytes, found {len(key)}")
    return key


def build_key_provider(namespace, key_files, key_names):
    """Build a Raw AES master key provider that contains one master key per (file, name) pair.

    On encrypt, the first key generates the data key and every key adds an EDK. On decrypt, any
    EDK whose provider id and key name match one of the keys can be unwrapped.
    """
    if len(key_files) != len(key_names):
        raise OracleError(
            f"--key-file and --key-name must come in pairs: "
            f"got {len(key_files)} --key-file and {len(key_names)} --key-name"
        )
    if not key_files:
        raise OracleError("missing --key-file and --key-name")

    wrapping_keys = {}
    for path, name in zip(key_files, key_names):
        name_bytes = name.encode("utf-8")
        if name_bytes in wrapping_keys:
            raise OracleError(f"duplicate --key-name {name}")
        wrapping_keys[name_bytes] = read_wrapping_key(path)

    class LocalKeyProvider(RawMasterKeyProvider):
        provider_id = namespace

        def _get_raw_key(self, key_id):
            return WrappingKey(
                wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                wrapping_key=wrapping_keys[key_id],
                wrapping_key_type=EncryptionKeyType.SYMMETRIC,
            )

    provider = LocalKeyProvider()
    for name_bytes in wrapping_keys:
        provider.add_master_key(name_bytes)
    return provider


def build_kms_key_provider(key_arns, endpoint_url):
    """Build a strict AWS KMS master key provider for the given key ARNs.

    On encrypt, the first key generates the data key and every key adds an EDK. On decrypt, only
    EDKs of the listed keys are sent to KMS.
    """
    if len(set(key_arns)) != len(key_arns):
        raise OracleError("duplicate --kms-key-arn")
    if endpoint_url is not None:
        # botocore 1.31 and later read a service's endpoint from AWS_ENDPOINT_URL_{SERVICE}, and
        # the provider creates its KMS clients from a default botocore session.
        os.environ["AWS_ENDPOINT_URL_KMS"] = endpoint_url
    return aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=list(key_arns))


def build_provider(args):
    """Build the key provider that the options name: Raw AES key files or AWS KMS keys."""
    if args.kms_key_arn:
        if args.key_file or args.key_name:
            raise OracleError("use either --key-file/--key-name or --kms-key-arn, not both")
        return build_kms_key_provider(args.kms_key_arn, args.kms_endpoint_url)
    if args.kms_endpoint_url is not None:
        raise OracleError("--kms-endpoint-url needs --kms-key-arn")
    return build_key_provider(args.namespace, args.key_file, args.key_name)


def parse_context(pairs):
    """Turn repeated KEY=VALUE options into an encryption context dict."""
    context = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise OracleError(f"invalid --context {pair!r}: expected KEY=VALUE")
        if key in context:
            raise OracleError(f"duplicate --context key {key!r}")
        context[key] = value
    return context


@contextlib.contextmanager
def open_streams(input_path, output_path):
    """Open the input and output ("-" for stdin and stdout) and yield them as (source, sink).

    If the body raises, a named output file is removed, so a failed run leaves no partial output.
    """
    with contextlib.ExitStack() as stack:
        if input_path == "-":
            source = sys.stdin.buffer
        else:
            try:
                source = stack.enter_context(open(input_path, "rb"))
            except OSError as error:
                raise OracleError(f"cannot open input {input_path}: {error.strerror}") from None

        if output_path == "-":
            yield source, sys.stdout.buffer
            sys.stdout.buffer.flush()
            return

        try:
            sink = open(output_path, "wb")
        except OSError as error:
            raise OracleError(f"cannot open output {output_path}: {error.strerror}") from None
        try:
            with sink:
                yield source, sink
        except BaseException:
            os.remove(output_path)
            raise

def copy_stream(stream, sink):
    while True:
        chunk = stream.read(COPY_CHUNK)
        if not chunk:
            break
        sink.write(chunk)


def split_raw_aes_info(provider_info):
    """Split Raw AES provider info into (key name, IV), or return None if it has another layout."""
    if len(provider_info) < RAW_AES_INFO_SUFFIX.size:
        return None
    name_length = len(provider_info) - RAW_AES_INFO_SUFFIX.size
    tag_bits, iv_length, iv = RAW_AES_INFO_SUFFIX.unpack_from(provider_info, name_length)
    if tag_bits != RAW_AES_TAG_BITS or iv_length != RAW_AES_IV_LENGTH:
        return None
    return provider_info[:name_length], iv


def describe_header(header):
    """Describe a parsed message header as a JSON-serializable dict."""
    edks = []
    for edk in header.encrypted_data_keys:
        provider_info = edk.key_provider.key_info
        raw_aes = split_raw_aes_info(provider_info) if edk.key_provider.provider_id != "aws-kms" else None
        # For a Raw AES EDK the key name is the provider info without its 20-byte suffix. For
        # aws-kms and unknown layouts the whole provider info is reported as the key name.
        key_name = raw_aes[0] if raw_aes is not None else provider_info
        edks.append(
            {
                "provider_id": edk.key_provider.provider_id,
                "key_name": key_name.decode("utf-8", errors="replace"),
                "provider_info_hex": provider_info.hex(),
                "ciphertext_length": len(edk.encrypted_data_key),
            }
        )
    # The SDK keeps EDKs in a set, so they are sorted to make the output stable.
    edks.sort(key=lambda item: (item["provider_id"], item["key_name"], item["provider_info_hex"]))

    return {
        "version": int(header.version.value),
        "algorithm_suite_id": int(header.algorithm.algorithm_id),
        "message_id_hex": header.message_id.hex(),
        "encryption_context": dict(sorted(header.encryption_context.items())),
        "encrypted_data_keys": edks,
        "content_type": int(header.content_type.value),
        "frame_length": int(header.frame_length),
    }


def new_client():
    # REQUIRE_ENCRYPT_REQUIRE_DECRYPT, the default of aws-encryption-sdk 4.0.7, is set explicitly so
    # that a different default cannot change it. It accepts only suites with key commitment.
    return aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )


def run_encrypt(args):
    provider = build_provider(args)
    context = parse_context(args.context)
    if args.frame_length <= 0:
        raise OracleError(f"invalid --frame-length {args.frame_length}: must be positive (framed content)")

    with open_streams(args.input, args.output) as (source, sink):
        with new_client().stream(
            mode="encrypt",
            source=source,
            key_provider=provider,
            encryption_context=context,
            algorithm=SUITE,
            frame_length=args.frame_length,
        ) as encryptor:
            copy_stream(encryptor, sink)


def run_decrypt(args):
    provider = build_provider(args)

    with open_streams(args.input, args.output) as (source, sink):
        # "decrypt-unsigned" rejects suites with a signature, which callseal never writes.
        with new_client().stream(mode="decrypt-unsigned", source=source, key_provider=provider) as decryptor:
            copy_stream(decryptor, sink)
            header = decryptor.header

        # aws-encryption-sdk 4.0.7 stops reading after the final frame and ignores anything that
        # follows. The SDK reads the source exactly, so one more byte here means trailing data.
        if source.read(1):
            raise TrailingDataError("trailing bytes after the final frame")

    if args.header_json is not None:
        with open(args.header_json, "w", encoding="utf-8") as header_file:
            json.dump(describe_header(header), header_file, indent=2)
            header_file.write("\n")


def add_key_options(parser):
    parser.add_argument(
        "--key-file",
        action="append",
        default=[],
        metavar="PATH",
        help="file containing a 32-byte wrapping key; repeat together with --key-name for several keys",
    )
    parser.add_argument(
        "--key-name",
        action="append",
        default=[],
        metavar="NAME",
        help="Raw AES key name of the preceding --key-file, such as clinic-1/v1",
    )
    parser.add_argument(
        "--kms-key-arn",
        action="append",
        default=[],
        metavar="ARN",
        help="AWS KMS key ARN that wraps or unwraps data keys, in place of key files; repeat for several keys",
    )
    parser.add_argument(
        "--kms-endpoint-url",
        metavar="URL",
        help="KMS endpoint to call instead of AWS's regional endpoint, such as a local emulator",
    )
    parser.add_argument(
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help=f"Raw AES key namespace, stored as the EDK provider id (default: {DEFAULT_NAMESPACE})",
    )
    parser.add_argument("--input", default="-", metavar="PATH", help="input file, or - for stdin (default)")
    parser.add_argument("--output", default="-", metavar="PATH", help="output file, or - for stdout (default)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="esdk_oracle.py",
        description="Encrypt or decrypt ESDK messages (suite 0x0478, Raw AES or AWS KMS keys) with aws-encryption-sdk.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    encrypt = commands.add_parser("encrypt", help="encrypt the input into one framed message")
    add_key_options(encrypt)
    encrypt.add_argument(
        "--frame-length", type=int, required=True, metavar="BYTES", help="plaintext bytes per frame"
    )
    encrypt.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="encryption context pair; repeat for several pairs",
    )
    encrypt.set_defaults(run=run_encrypt)

    decrypt = commands.add_parser("decrypt", help="decrypt one message")
    add_key_options(decrypt)
    decrypt.add_argument(
        "--header-json",
        metavar="PATH",
        help="after a successful decryption, write the message header to PATH as JSON",
    )
    decrypt.set_defaults(run=run_decrypt)
    return parser


def main():
    # The SDK logs some errors itself before raising them. Only the one-line message below goes to
    # stderr, so that callers can show it as it is.
    logging.basicConfig(level=logging.CRITICAL)

    args = build_parser().parse_args()
    try:
        args.run(args)
    except OracleError as error:
        print(f"esdk_oracle: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # Any SDK failure becomes exit status 1 with a one-line message.
        detail = " ".join(str(error).split()) or "no details"
        print(f"esdk_oracle: {args.command} failed: {type(error).__name__}: {detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
