"""The sagas and messages of the saga tests, shared by the in-process tests and the processes.

- `Counting`: five steps per key, in any order (each may start it: the order messages arrive in is
  not the order they were sent in); each step records its number in the state and an effect row,
  and the fifth completes the saga. A lost update shows as a state missing a step whose effect
  committed.
- `Waiting`: started by `Begin`, it schedules `Expire` to itself and completes when it fires
  (or when `Finish` comes first, after which the timeout is ignored).
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel
from sqlalchemy import Column, Integer, MetaData, String, Table, insert

from tidings import Command, Saga, SagaContext, handles, starts, timeout

STEPS = 5

#: The tests' own table: one row per step's effect, no unique constraint (a second effect of one
#: step must show as a second row).
domain = MetaData()
effects = Table(
    "saga_test_effects",
    domain,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(64), nullable=False),
    Column("n", Integer, nullable=False),
)


class Step(Command, name="saga-test.step"):
    key: str
    n: int


class Tally(BaseModel):
    steps: list[int] = []


class Counting(Saga[Tally], name="counting"):
    @starts(Step, by="key")
    async def step(self, message: Step, ctx: SagaContext) -> None:
        if message.n in self.state.steps:
            return  # the same step again under another message id: nothing new
        self.state.steps.append(message.n)
        await ctx.session.execute(insert(effects).values(key=message.key, n=message.n))
        if len(self.state.steps) == STEPS:
            self.complete()


class Begin(Command, name="saga-test.begin"):
    key: str
    #: Seconds until the saga's timeout fires.
    after: float


class Finish(Command, name="saga-test.finish"):
    key: str


class Expire(Command, name="saga-test.expire"):
    pass


class Deadline(BaseModel):
    key: str = ""


class Waiting(Saga[Deadline], name="waiting", final=("expired", "finished")):
    @starts(Begin, by="key", to="waiting")
    async def begin(self, message: Begin, ctx: SagaContext) -> None:
        self.state.key = message.key
        await ctx.timeout(Expire(), after=timedelta(seconds=message.after))

    @handles(Finish, by="key", during="waiting", to="finished")
    async def finish(self, message: Finish, ctx: SagaContext) -> None:
        pass

    @timeout(Expire, during="waiting", to="expired")
    async def expire(self, message: Expire, ctx: SagaContext) -> None:
        await ctx.session.execute(insert(effects).values(key=self.state.key, n=-1))
