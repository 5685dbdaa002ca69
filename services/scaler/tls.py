"""TLS for the scaler's gRPC port, the way KEDA dials external scalers.

KEDA takes its side of the handshake from the trigger's authentication parameters
(`caCert`, `tlsClientCert`, `tlsClientKey`), given as PEM text by a TriggerAuthentication:

    apiVersion: v1
    kind: Secret
    metadata: {name: elastune-scaler-tls}
    stringData:
      ca.crt: |            # the CA that signed the scaler's certificate
        -----BEGIN CERTIFICATE----- ...
      tls.crt: |           # KEDA's client certificate (mutual TLS only)
        -----BEGIN CERTIFICATE----- ...
      tls.key: |
        -----BEGIN PRIVATE KEY----- ...
    ---
    apiVersion: keda.sh/v1alpha1
    kind: TriggerAuthentication
    metadata: {name: elastune-scaler-tls}
    spec:
      secretTargetRef:
        - {parameter: caCert, name: elastune-scaler-tls, key: ca.crt}
        - {parameter: tlsClientCert, name: elastune-scaler-tls, key: tls.crt}
        - {parameter: tlsClientKey, name: elastune-scaler-tls, key: tls.key}

and each `external` / `external-push` trigger names it with
`authenticationRef: {name: elastune-scaler-tls}`. The certificate the scaler serves must
name the host in `scalerAddress` (e.g. `elastune-scaler.<namespace>.svc`) in its subject
alternative names, since KEDA verifies it against that address.

The scaler's side is three PEM files (a mounted Secret, e.g. a cert-manager Certificate):
ELASTUNE_TLS_CERT_FILE and ELASTUNE_TLS_KEY_FILE turn TLS on; ELASTUNE_TLS_CLIENT_CA_FILE
also requires a client certificate signed by that CA (mutual TLS), so only KEDA can ask.
With TLS on, the gRPC health service is on the TLS port too: kubelet's built-in gRPC probe
speaks plaintext only, so probe the scaler with a TCP probe or its metrics port instead.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from .config import ScalerConfig


def server_credentials(config: ScalerConfig) -> grpc.ServerCredentials | None:
    """The port's credentials from the configured PEM files; None when TLS is off."""
    if not config.tls_cert_file:
        return None
    cert = Path(config.tls_cert_file).read_bytes()
    key = Path(config.tls_key_file).read_bytes()
    client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None,
    )
