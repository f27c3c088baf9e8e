"""How every Kafka client of the service and the tools connects (KAFKA_SECURITY_PROTOCOL and friends,
read by stream.settings): the aiokafka keyword arguments and Faust's broker credentials."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class KafkaSecurity:
    """How the Kafka clients authenticate (KAFKA_SECURITY_PROTOCOL and friends)."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: Path | None = None  # None: the system's CA certificates

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol.endswith("SSL")

    def _ssl_context(self) -> Any:
        from aiokafka.helpers import create_ssl_context

        return create_ssl_context(cafile=self.ssl_cafile) if self.tls else None

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every aiokafka client (consumer, producer, admin); {} for PLAINTEXT."""
        if self.protocol == "PLAINTEXT":
            return {}
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.sasl:
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password)
        if self.tls:
            kwargs["ssl_context"] = self._ssl_context()
        return kwargs

    def faust_credentials(self) -> Any:
        """faust.App(broker_credentials=...): None for PLAINTEXT."""
        import faust

        if self.sasl:
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         mechanism=self.sasl_mechanism, ssl_context=self._ssl_context())
        return faust.SSLCredentials(self._ssl_context()) if self.tls else None
