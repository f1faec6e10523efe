"""The RabbitMQ transport (`amqp://`, `amqps://`): `RabbitMQTransport`, `RabbitMQSettings`, `TLSSettings`.

The modules, each importing only modules below it:

- `transport`: `RabbitMQTransport`, the port on one aio-pika robust connection; it publishes, and
  hands the others the callables and values they need.
- `consumer`: one `receive()`'s channel, buffer and deliveries; `error_queues`: listing, replaying
  and purging error queues; `declarations`: declaring the topology on the broker; `permissions`:
  the `set_permissions` patterns a service's broker user needs (`tidings topology --permissions`).
- `acks`: the settlements of one consuming channel; `codec`: the CloudEvents AMQP binding (flat
  header map to AMQP message and back); `topology`: the names and arguments of everything
  declared; `channels`: waiting for a channel to reopen, and a throwaway channel for a short look;
  `failover`: the robust connection that goes on to the next node of a cluster after losing one.
- `properties`: the fast encoding of AMQP properties; `settings`: `RabbitMQSettings`, read from
  the URL.
- `hosts`: several hosts in one URL, split into one URL per node; `tls`: `TLSSettings`, the
  `ssl.SSLContext` of `amqps://`, and TLS failures said plainly.
"""

from tidings.transports.rabbitmq.settings import RabbitMQSettings
from tidings.transports.rabbitmq.tls import TLSSettings
from tidings.transports.rabbitmq.transport import RabbitMQTransport

__all__ = ["RabbitMQSettings", "RabbitMQTransport", "TLSSettings"]
