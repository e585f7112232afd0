"""BatchUpdateBuilder: the BatchUpdates it diffs, applied in order to a model of the batch,
reproduce every step's real row list, across adds, finishes and aborts (a request leaves for
good), preemption and steps a request does not sample in (it leaves and comes back),
reordering, and verification rows (new in every step)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.logits_process import BatchUpdate, BatchUpdateBuilder, MoveDirectionality
from engine.sampler import SamplingRow
from engine.sampling_params import SamplingParams


def apply_update(model: dict[int, object], update: BatchUpdate | None) -> dict[int, object]:
    """The documented semantics: added, then removed, then moves in order."""
    if update is None:
        return model
    model = dict(model)
    removed = set(update.removed)
    for index, params, _prompt, output in update.added:
        assert index not in removed
        model[index] = (params, output)
    for index in update.removed:
        assert index in model, f"removed {index}, which held nothing"
        del model[index]
    for a, b, direction in update.moved:
        row_a, row_b = model.pop(a, None), model.pop(b, None)
        assert row_a is not None
        if direction is MoveDirectionality.UNIDIRECTIONAL:
            assert row_b is None, f"{a} -> {b} onto a held index"
            model[b] = row_a
        else:
            assert row_b is not None, f"swap {a} <-> {b} with an empty index"
            model[a], model[b] = row_b, row_a
    assert sorted(model) == list(range(update.batch_size))
    return model


class Req:
    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.params = SamplingParams(extra_args={"tag": rid})
        self.output: list[int] = []

    def row(self, drafts: tuple[int, ...] = ()) -> SamplingRow:
        return SamplingRow(
            self.params,
            sampling_seed=0,
            output_position=len(self.output),
            prompt_token_ids=(1, 2),
            output_token_ids=self.output,
            draft_token_ids=drafts,
            request_id=self.rid,
        )


# One step: requests to finish (by position among the live ones), new requests to add, and
# which live requests sample, in which order, with how many drafts.
step_data = st.tuples(
    st.lists(st.integers(0, 9), max_size=3),  # finish / abort
    st.integers(0, 3),  # new requests
    st.randoms(use_true_random=False),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(step_data, min_size=1, max_size=12))
def test_batch_updates_reproduce_the_row_lists(steps):
    builder = BatchUpdateBuilder()
    model: dict[int, object] = {}
    live: list[Req] = []
    ended: set[str] = set()
    counter = 0
    for finish, num_new, rnd in steps:
        for position in sorted(set(finish), reverse=True):
            if position < len(live):
                ended.add(live.pop(position).rid)
        for _ in range(num_new):
            live.append(Req(f"r{counter}"))
            counter += 1
        # Preempted / unscheduled / prefilling requests do not sample this step.
        sampling = [r for r in live if rnd.random() < 0.75]
        rnd.shuffle(sampling)
        drafts = [tuple(rnd.choices(range(5), k=rnd.randint(0, 2))) for _ in sampling]
        plain = [r.row() for r, d in zip(sampling, drafts, strict=True) if not d]
        spec = [
            r.row(d[:j])
            for r, d in zip(sampling, drafts, strict=True)
            if d
            for j in range(len(d) + 1)
        ]
        rows = plain + spec
        update = builder.update(rows)
        model = apply_update(model, update)
        assert len(model) == len(rows)
        for i, row in enumerate(rows):
            params, output = model[i]
            assert params is row.params  # the right request at the right index
            assert list(output) == [*row.output_token_ids, *row.draft_token_ids]
            if not row.draft_token_ids:
                assert output is row.output_token_ids  # the live list, as vLLM hands it over
            assert params.extra_args["tag"] not in ended
        if update is not None:
            added = [index for index, *_ in update.added]
            assert len(set(added)) == len(added)
        for r in sampling:  # each sampled request gains a token
            r.output.append(rnd.randrange(5))


def test_unchanged_batch_gives_none_and_a_replaced_request_is_re_added():
    a, b = Req("a"), Req("b")
    builder = BatchUpdateBuilder()
    first = builder.update([a.row(), b.row()])
    assert first is not None and [i for i, *_ in first.added] == [0, 1]
    a.output.append(3)
    assert builder.update([a.row(), b.row()]) is None  # outputs grow in the live lists
    swapped = builder.update([b.row(), a.row()])
    assert swapped == BatchUpdate(2, [], [], [(1, 0, MoveDirectionality.SWAP)])
    b2 = Req("b")  # the same id, a different request (another params object): re-added
    update = builder.update([b2.row(), a.row()])
    assert update is not None and update.removed == [] and update.moved == []
    assert [(i, p) for i, p, *_ in update.added] == [(0, b2.params)]
    finished = builder.update([a.row()])
    assert finished == BatchUpdate(1, [0], [], [(1, 0, MoveDirectionality.UNIDIRECTIONAL)])
