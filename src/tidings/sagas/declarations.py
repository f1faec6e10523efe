"""What a saga is: a class with a typed state, and the steps its decorators declare.

    class OrderState(BaseModel):
        order_id: str = ""
        total: Decimal = Decimal(0)

    class OrderProcess(Saga[OrderState], final=("confirmed", "cancelled")):
        @starts(OrderPlaced, by="order_id", to="reserving")
        async def placed(self, event: OrderPlaced, ctx: SagaContext) -> None:
            self.state.order_id = event.order_id
            await ctx.send(ReserveStock(order_id=event.order_id))

        @handles(PaymentFailed, by="order_id", during="charging", to="cancelled")
        async def failed(self, event: PaymentFailed, ctx: SagaContext) -> None:
            await ctx.send(ReleaseStock(order_id=event.order_id))

Each step names the message type it takes and how that message finds its instance (`by=`: a field
of the message, `header(name)`, `correlation()`, or a function of the message and its envelope;
a `timeout` finds it by the headers its scheduling put on it). `starts` may create the instance;
`handles` only acts on an existing one. `during=` and `to=` are optional: the states the step
acts in, and those it moves to (one is taken automatically; of several, the handler picks with
`self.become(...)`). Entering a state named in `final=`, or calling `self.complete()`, completes
the saga. The declarations are all the runner and `tidings saga diagram` read.

Nothing here touches a database: `import tidings` stays free of SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from tidings.envelope import Envelope
from tidings.errors import ConfigurationError, InvalidMessageType
from tidings.messages import Command, Message, validate_wire_name, wire_name_of
from tidings.sagas.headers import SAGA_KEY

__all__ = [
    "Finder",
    "MissingPolicy",
    "Saga",
    "SagaDefinition",
    "Step",
    "correlation",
    "definition_of",
    "handles",
    "header",
    "new_state",
    "starts",
    "timeout",
]

S = TypeVar("S", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Awaitable[None]])

#: How a message finds its saga instance: the instance's key from the message and its envelope,
#: or None when the message carries none.
Finder = Callable[[Message, Envelope], "str | None"]

#: What happens to a message for no instance (a saga that completed, or that does not exist):
#: `"ignore"` acknowledges and counts it (NServiceBus's default; the news is late or early, not
#: wrong), `"dead-letter"` sends it to the error queue with the reason (reason code `rejected`).
MissingPolicy = Literal["ignore", "dead-letter"]
_POLICIES = ("ignore", "dead-letter")

StepKind = Literal["starts", "handles", "timeout"]


@dataclass(frozen=True, slots=True)
class _Key:
    """A finder with a name the diagram and error messages can show."""

    label: str
    find: Finder

    def __call__(self, message: Message, envelope: Envelope) -> str | None:
        return self.find(message, envelope)


def header(name: str) -> Finder:
    """Find the instance by a header of the message (its value is the key)."""
    return _Key(f"header {name}", lambda message, envelope: envelope.headers.get(name))


def correlation() -> Finder:
    """Find the instance by the message's correlation id (the conversation it belongs to)."""
    return _Key("correlation id", lambda message, envelope: envelope.correlation_id or envelope.id)


def _field(name: str) -> Finder:
    def find(message: Message, envelope: Envelope) -> str | None:
        value = getattr(message, name)
        return None if value is None else str(value)

    return _Key(name, find)


@dataclass(frozen=True, slots=True)
class Step:
    """One message type a saga takes: how it finds its instance, and what it may do."""

    message_type: type[Message]
    #: The saga method that handles it.
    method: str
    kind: StepKind
    find: Finder
    #: The states it acts in (None: any); a message in another state is ignored and counted.
    during: frozenset[str] | None
    #: The states it may move to, in declaration order (empty: it stays where it is).
    to: tuple[str, ...]
    #: This step's policy for a message for no instance (None: the saga's).
    missing: MissingPolicy | None

    @property
    def starts(self) -> bool:
        return self.kind == "starts"

    def acts_in(self, status: str | None, *, has_states: bool) -> bool:
        """Whether the step acts on an existing instance in `status`. A starting step of a saga
        with states acts only on a new instance (as a state machine's initial transition), unless
        its `during=` names states it also acts in."""
        if self.during is not None:
            return status in self.during
        return not (self.starts and has_states)

    @property
    def key_label(self) -> str:
        return self.find.label if isinstance(self.find, _Key) else getattr(self.find, "__name__", "finder")


@dataclass(frozen=True, slots=True)
class _Declared:
    """What a decorator leaves on the function, until the class is made."""

    message_type: type[Message]
    kind: StepKind
    by: str | Finder | None
    during: tuple[str, ...] | None
    to: tuple[str, ...]
    missing: MissingPolicy | None


def _states(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a saga state is a non-empty string, not {name!r}")
    return names


def _declare(
    message_type: type[Message],
    kind: StepKind,
    by: str | Finder | None,
    during: str | Iterable[str] | None,
    to: str | Iterable[str] | None,
    missing: MissingPolicy | None,
) -> Callable[[F], F]:
    wire_name_of(message_type)  # an InvalidMessageType now, not when the bus meets it
    if missing is not None and missing not in _POLICIES:
        raise ConfigurationError(f"missing= takes one of {_POLICIES}, not {missing!r}")
    declared = _Declared(message_type, kind, by, _states(during), _states(to) or (), missing)

    def decorate(method: F) -> F:
        steps: list[_Declared] = list(getattr(method, "__saga_steps__", ()))
        steps.append(declared)
        method.__saga_steps__ = steps  # type: ignore[attr-defined]
        return method

    return decorate


def starts(
    message_type: type[Message],
    *,
    by: str | Finder,
    during: str | Iterable[str] | None = None,
    to: str | Iterable[str] | None = None,
) -> Callable[[F], F]:
    """The method handles `message_type` and may start an instance: a message that finds none
    creates it (a new state), one that finds one acts on it. `by`: a field name or a `Finder`."""
    return _declare(message_type, "starts", by, during, to, None)


def handles(
    message_type: type[Message],
    *,
    by: str | Finder,
    during: str | Iterable[str] | None = None,
    to: str | Iterable[str] | None = None,
    missing: MissingPolicy | None = None,
) -> Callable[[F], F]:
    """The method handles `message_type` for an existing instance; a message for none follows
    `missing` (default: the saga's policy)."""
    return _declare(message_type, "handles", by, during, to, missing)


def timeout(
    message_type: type[Command],
    *,
    during: str | Iterable[str] | None = None,
    to: str | Iterable[str] | None = None,
) -> Callable[[F], F]:
    """The method handles a timeout the saga scheduled with `ctx.timeout(message, after=...)`.

    It finds its instance by the headers the scheduling put on it. A timeout for an instance that
    completed meanwhile is ignored and counted (`SagaStats.timeouts_ignored`)."""
    if not (isinstance(message_type, type) and issubclass(message_type, Command)):
        raise InvalidMessageType(
            f"a timeout is a Command class (sent to the saga's service), not {message_type!r}"
        )
    return _declare(message_type, "timeout", None, during, to, None)


@dataclass(frozen=True, slots=True)
class SagaDefinition:
    """A saga class's declarations, read once when the class is made."""

    name: str
    state_type: type[BaseModel]
    #: Its steps by the wire name of their message type.
    steps: dict[str, Step]
    final: frozenset[str]
    missing: MissingPolicy

    @property
    def states(self) -> list[str]:
        """Every state a step names, in the order they are first named (final ones included)."""
        seen: dict[str, None] = {}
        for step in self.steps.values():
            for name in (*sorted(step.during or ()), *step.to):
                seen.setdefault(name, None)
        for name in sorted(self.final):
            seen.setdefault(name, None)
        return list(seen)


class Saga(Generic[S]):
    """Base of a saga: subclass `Saga[YourState]` and declare steps with `starts`, `handles` and
    `timeout` (module docstring). Class keywords: `name=` (the saga's stored name, default the
    class name; keep it when renaming the class), `final=` (states that complete it), `missing=`
    (the policy for messages for no instance, default `"ignore"`).

    One object is made per step, with the instance's key, state and current state name; the step's
    method changes `self.state`, may `become` another state, and may `complete` the saga.
    """

    __saga__: ClassVar[SagaDefinition]

    def __init_subclass__(
        cls,
        *,
        name: str | None = None,
        final: str | Iterable[str] = (),
        missing: MissingPolicy = "ignore",
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if missing not in _POLICIES:
            raise ConfigurationError(f"{cls.__name__}: missing= takes one of {_POLICIES}, not {missing!r}")
        cls.__saga__ = SagaDefinition(
            name=validate_wire_name(name if name is not None else cls.__name__),
            state_type=_state_type(cls),
            steps=_steps(cls),
            final=frozenset(_states(final) or ()),
            missing=missing,
        )

    def __init__(self, key: str, state: S | None, status: str | None) -> None:
        #: The instance's key (what its messages find it by).
        self.key = key
        self._state = state
        self._status = status
        self._completed = False

    @property
    def state(self) -> S:
        """The instance's state. A new instance whose state model has required fields has none
        until its starting step assigns one (`self.state = OrderState(...)`)."""
        if self._state is None:
            raise ConfigurationError(
                f"{type(self).__name__} {self.key!r} is new and its state has required fields: "
                "assign self.state in the starting step before reading it"
            )
        return self._state

    @state.setter
    def state(self, value: S) -> None:
        self._state = value

    @property
    def has_state(self) -> bool:
        return self._state is not None

    @property
    def status(self) -> str | None:
        """The state the instance is in (one of the declared ones), or None before any."""
        return self._status

    def become(self, status: str) -> None:
        """Move to `status`: one of the step's `to=` states. A final state completes the saga."""
        self._status = status
        if status in self.__saga__.final:
            self._completed = True

    def complete(self) -> None:
        """Complete the saga: its state is saved one last time and no message acts on it again."""
        self._completed = True

    @property
    def completed(self) -> bool:
        return self._completed


def definition_of(saga_type: object) -> SagaDefinition:
    """The declarations of a `Saga` subclass; `ConfigurationError` for anything else."""
    if not (isinstance(saga_type, type) and issubclass(saga_type, Saga) and saga_type is not Saga):
        raise ConfigurationError(f"{saga_type!r} is not a Saga subclass")
    return saga_type.__saga__


def new_state(definition: SagaDefinition) -> BaseModel | None:
    """The state of a new instance: the model with its defaults, or None when it has required fields."""
    try:
        return definition.state_type()
    except ValidationError:
        return None


def _state_type(cls: type) -> type[BaseModel]:
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Saga):
            (argument,) = get_args(base)
            if isinstance(argument, type) and issubclass(argument, BaseModel):
                return argument
            raise ConfigurationError(f"{cls.__name__}: Saga[...] takes a Pydantic model, not {argument!r}")
    inherited = getattr(cls, "__saga__", None)
    if inherited is not None:
        return inherited.state_type  # type: ignore[no-any-return]
    raise ConfigurationError(f"{cls.__name__}: subclass Saga[YourState], with a Pydantic model as its state")


def _steps(cls: type) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    # In declaration order (the diagram follows it), base classes first.
    methods = {name: value for klass in reversed(cls.__mro__) for name, value in vars(klass).items()}
    for attribute, method in methods.items():
        for declared in getattr(method, "__saga_steps__", ()):
            wire_name = wire_name_of(declared.message_type)
            if wire_name in steps:
                raise ConfigurationError(
                    f"{cls.__name__}: {wire_name!r} is taken by {steps[wire_name].method} and {attribute}"
                )
            steps[wire_name] = Step(
                message_type=declared.message_type,
                method=attribute,
                kind=declared.kind,
                find=_finder(declared),
                during=None if declared.during is None else frozenset(declared.during),
                to=declared.to,
                missing=declared.missing,
            )
    if steps and not any(step.starts for step in steps.values()):
        raise ConfigurationError(f"{cls.__name__}: no step starts it (declare one with @starts)")
    return steps


def _finder(declared: _Declared) -> Finder:
    if declared.kind == "timeout":
        return header(SAGA_KEY)
    by = declared.by
    if isinstance(by, str):
        fields = declared.message_type.model_fields
        if by not in fields:
            raise ConfigurationError(f"{declared.message_type.__name__} has no field {by!r} (by={by!r})")
        return _field(by)
    if callable(by):
        return by
    raise ConfigurationError(f"by= takes a field name or a finder, not {by!r}")
