"""A saga's Mermaid diagram, drawn from its declarations alone (`tidings saga diagram`).

A saga with states (`during=`/`to=`/`final=`) is a `stateDiagram-v2`: an arrow per step from each
state it acts in to each state it may move to, labelled with its message (a timeout marked so);
starting steps come from `[*]`, final states go to `[*]`. A step without `during=` acts in every
state that is not final; a step without `to=` stays where it is (a loop). A saga without states
is a flowchart of its messages into the saga.
"""

from __future__ import annotations

from tidings.sagas.declarations import SagaDefinition, Step

__all__ = ["mermaid"]


def mermaid(definition: SagaDefinition) -> str:
    """The Mermaid source of the saga's diagram."""
    if not definition.states:
        return _flowchart(definition)
    lines = ["stateDiagram-v2", f"    %% saga {definition.name} (state: {definition.state_type.__name__})"]
    # Names that are no Mermaid ids are declared first, shown as they are.
    lines += [f'    state "{name}" as {_id(name)}' for name in definition.states if _id(name) != name]
    acting = [name for name in definition.states if name not in definition.final]
    edges: dict[tuple[str, str], list[str]] = {}
    for step in definition.steps.values():
        label = _label(step)
        sources = _sources(step, acting)
        targets = list(step.to)
        for source in sources:
            for target in targets or ([source] if source != "[*]" else []):
                edges.setdefault((source, target), []).append(label)
    for (source, target), labels in edges.items():
        lines.append(f"    {_id(source)} --> {_id(target)} : {' / '.join(labels)}")
    for name in sorted(definition.final):
        lines.append(f"    {_id(name)} --> [*]")
    return "\n".join(lines) + "\n"


def _sources(step: Step, acting: list[str]) -> list[str]:
    sources = [name for name in acting if step.acts_in(name, has_states=True)]
    # A starting step also acts on no instance: that is where a saga begins.
    return ["[*]", *sources] if step.starts else sources


def _label(step: Step) -> str:
    name = step.message_type.__name__
    if step.kind == "timeout":
        return f"{name} (timeout)"
    return f"{name} by {step.key_label}"


def _id(state: str) -> str:
    """A Mermaid state id: letters, digits and underscores (the name shown is kept by `state "x" as`)."""
    if state == "[*]":
        return state
    return "".join(character if character.isalnum() else "_" for character in state)


def _flowchart(definition: SagaDefinition) -> str:
    lines = ["flowchart LR", f"    saga(({definition.name}))"]
    for index, step in enumerate(definition.steps.values()):
        verb = {"starts": "starts", "handles": "handles", "timeout": "timeout"}[step.kind]
        lines.append(f"    m{index}[{_label(step)}] -- {verb} --> saga")
    return "\n".join(lines) + "\n"
