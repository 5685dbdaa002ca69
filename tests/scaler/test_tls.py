"""The scaler over TLS and mutual TLS, dialled the way KEDA dials it (CA, client cert and key as PEM),
with certificates made by a throwaway CA (the `openssl` CLI) for each test session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from services.proto import externalscaler_pb2 as pb
from services.proto import externalscaler_pb2_grpc as pb_grpc
from services.scaler.config import ScalerConfig
from services.scaler.server import ScalerService

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates")

STORE = "redis://127.0.0.1:1/0"  # GetMetricSpec needs no store, so none is running
REF = pb.ScaledObjectRef(name="so", namespace="ns", scalerMetadata={"stage": "decode"})


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, name: str, ca: str, san: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "rogue-ca")
    make_cert(d, "scaler", "ca", "DNS:localhost,IP:127.0.0.1")
    make_cert(d, "keda", "ca", "DNS:keda-operator")
    make_cert(d, "intruder", "rogue-ca", "DNS:keda-operator")
    return d


async def start(pki: Path, mutual: bool) -> ScalerService:
    config = ScalerConfig(port=0, store_url=STORE, tls_cert_file=str(pki / "scaler.crt"),
                          tls_key_file=str(pki / "scaler.key"),
                          tls_client_ca_file=str(pki / "ca.crt") if mutual else "")
    config.validate()
    service = ScalerService(config)
    await service.start()
    return service


async def spec(port: int, creds: grpc.ChannelCredentials | None) -> pb.GetMetricSpecResponse:
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.secure_channel(target, creds) if creds else grpc.aio.insecure_channel(target)
    async with channel:
        return await pb_grpc.ExternalScalerStub(channel).GetMetricSpec(REF, timeout=5)


def keda_creds(pki: Path, ca: str = "ca", client: str | None = None) -> grpc.ChannelCredentials:
    """What KEDA builds from a TriggerAuthentication's caCert / tlsClientCert / tlsClientKey."""
    root = (pki / f"{ca}.crt").read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=(pki / f"{client}.key").read_bytes(),
                                        certificate_chain=(pki / f"{client}.crt").read_bytes())


async def test_tls_serves_clients_that_trust_its_ca(pki):
    service = await start(pki, mutual=False)
    try:
        answer = await spec(service.port, keda_creds(pki))
        assert answer.metricSpecs[0].metricName == "decode-desired-replicas"
        for creds in (None, keda_creds(pki, ca="rogue-ca")):  # plaintext, or a CA that did not sign it
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await spec(service.port, creds)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop(0.5)


async def test_mutual_tls_requires_a_client_certificate_from_its_ca(pki):
    service = await start(pki, mutual=True)
    try:
        answer = await spec(service.port, keda_creds(pki, client="keda"))
        assert answer.metricSpecs[0].targetSizeFloat > 0
        for creds in (keda_creds(pki), keda_creds(pki, client="intruder")):  # no client cert, or a foreign one
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await spec(service.port, creds)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.stop(0.5)


@pytest.mark.parametrize("fields", [{"tls_cert_file": "c.pem"}, {"tls_key_file": "k.pem"},
                                    {"tls_client_ca_file": "ca.pem"}])
def test_tls_settings_must_be_complete(fields):
    with pytest.raises(ValueError, match="tls_"):
        ScalerConfig(store_url=STORE, **fields).validate()
