"""Keeps the device's mutual-TLS certificate from expiring: renewal over the authenticated channel.

    at start, then daily -> a new key (here, never sent) + CSR -> RenewCertificate with the current
    certificate -> the server's policy decides (due with a third of the lifetime left; never for a
    revoked device) -> renewed: key + certificate written durably (pki.TlsFiles.replace_key_and_cert), the
    channel reopened with them; not due: nothing changes, and the answer says when to ask again

A failed check (server down) is one log line; the next check comes on schedule. A refusal as revoked stops
the agent (DeviceRevokedError), as on every other call.
"""

from __future__ import annotations

import logging
import time

import grpc

from edgefleet import pki
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.connection import Connection, describe_failure, mutual_tls_channel, refused_as_revoked
from edgefleet.agent.exits import DeviceRevokedError
from edgefleet.v1 import device_pb2

log = logging.getLogger("edgefleet.agent")


class CertificateRenewer:
    def __init__(self, config: AgentConfig, tls: pki.TlsFiles, connection: Connection):
        self.config = config
        self.tls = tls
        self.connection = connection
        self.renew_after_ms = 0  # what the server last said; 0 = ask

    async def check(self) -> bool:
        """Asks for a renewal when due (or not yet known); True when the certificate was renewed. Raises
        DeviceRevokedError when the server refuses this device as revoked."""
        if self.config.insecure_plaintext:
            return False
        if self.renew_after_ms and time.time() * 1000 < self.renew_after_ms:
            return False
        key = pki.new_key()
        try:
            reply = await self.connection.stub.RenewCertificate(
                device_pb2.RenewCertificateRequest(csr_pem=pki.make_csr(key, self.connection.device_id)),
                timeout=self.config.rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            if refused_as_revoked(e):
                raise DeviceRevokedError(
                    "the server refused this device's certificate renewal as revoked"
                ) from e
            log.warning("certificate renewal check failed: %s", describe_failure(e))
            return False
        if not reply.renewed:
            self.renew_after_ms = reply.renew_after_unix_ms
            return False
        certificate = pki.load_cert(reply.certificate_pem)
        if pki.identity_of(reply.certificate_pem).name != self.connection.device_id:
            log.error("the server's renewed certificate names another device; keeping the current one")
            return False
        self.tls.replace_key_and_cert(key, certificate)
        self.renew_after_ms = 0
        log.info(
            "renewed the device certificate (valid until %s)", certificate.not_valid_after_utc.isoformat()
        )
        await self.connection.reopen(mutual_tls_channel(self.config, self.tls))
        return True
