"""The model registry: immutable releases, the promotion gate, consumers that resolve the pointer once."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from weakseg.flows.cli import main
from weakseg.tasks import registry as reg
from weakseg.tasks import storage
from weakseg.tasks.segment.inference import load_model

GATE = {"max_side": 96, "tta": "1", "device": "cpu", "limit": 8}  # fast: 8 of the 16 val images


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(background_run, tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    """The trained synthetic model ("good") and an untrained one with the same classes ("bad")."""
    data, shards, good = background_run
    bad = tmp_path_factory.mktemp("untrained") / "model.pt"
    bad.write_bytes(tiny_checkpoint(load_model(good, "cpu").classes, seed=3))
    return {"data": data, "shards": shards, "good": good, "bad": str(bad)}


def promote(model: str, registry: str, **kw):
    from weakseg.flows.promote_model import promote_model

    return promote_model(model=model, registry=registry, return_state=True, **{**GATE, **kw})


# ----------------------------------------------------------------------------- releases


def test_publishing_is_content_addressed_idempotent_and_never_rewrites(tmp_path, tiny_checkpoint):
    data = tiny_checkpoint(["background", "cat", "dog"])
    registry = str(tmp_path / "registry")
    release = reg.publish_release(registry, data)
    model_pt = Path(release.model_url)
    assert model_pt == tmp_path / "registry" / "releases" / release.model_id / "model.pt"
    assert model_pt.read_bytes() == data
    assert release.model_id == load_model(str(model_pt), "cpu").model_id  # the id every table records
    card = json.loads((model_pt.parent / "card.json").read_text())
    assert card["classes"] == ["background", "cat", "dog"] and card["sha256"] == release.sha256
    assert {"metrics", "manifest", "refined_from", "thresholds", "created_at"} <= card.keys()

    stamp = (model_pt.stat().st_mtime_ns, (model_pt.parent / "card.json").stat().st_mtime_ns)
    again = reg.publish_release(registry, data)  # a no-op
    assert again.model_id == release.model_id
    assert (model_pt.stat().st_mtime_ns, (model_pt.parent / "card.json").stat().st_mtime_ns) == stamp

    model_pt.write_bytes(tiny_checkpoint(["background", "cat", "dog"], seed=1))  # tampered under the same id
    with pytest.raises(reg.RegistryError, match="never rewritten"):
        reg.publish_release(registry, data)


def test_a_second_training_never_changes_the_first_release(prefect_harness, models, tmp_path):
    from weakseg.flows.train_mil import train_mil

    registry = str(tmp_path / "registry")
    small = dict(shards=models["shards"], epochs=1, steps_per_epoch=2, batch_size=4, input_size=96,
                 head_widths=[16, 16, 16], output_stride=8, num_workers=0, checkpoint_every=0, val_every=0,
                 progress=False, pretrained="none", registry=registry)
    first = train_mil(out=str(tmp_path / "a"), seed=0, **small)["release"]
    before = _sha(first["url"]), _sha(Path(first["url"]).parent / "card.json")
    second = train_mil(out=str(tmp_path / "b"), seed=1, **small)["release"]
    assert second["model_id"] != first["model_id"]
    assert (_sha(first["url"]), _sha(Path(first["url"]).parent / "card.json")) == before
    assert _sha(first["url"]) == _sha(tmp_path / "a" / "model.pt")
    assert sorted(p.name for p in (tmp_path / "registry" / "releases").iterdir()) == sorted(
        [first["model_id"], second["model_id"]])


# ----------------------------------------------------------------------------- the gate


def test_the_gate_promotes_a_better_model_and_refuses_a_worse_one(prefect_harness, models, tmp_path):
    registry, gt = str(tmp_path / "registry"), models["data"]
    first = promote(models["good"], registry, ground_truth=gt)  # no current release: always passes
    assert first.is_completed()
    good = first.result()
    assert good["promoted"] and good["previous"] is None
    assert reg.read_pointer(registry)["model_id"] == good["model_id"] == load_model(models["good"]).model_id

    refused = promote(models["bad"], registry, ground_truth=gt)
    assert refused.is_failed() and "refused" in refused.message
    result = refused.result(raise_on_failure=False)
    assert not result["promoted"] and result["previous"] == good["model_id"]
    cmp = result["comparison"]
    assert cmp["metric"] == "mean_iou" and cmp["candidate"] < cmp["current"]
    assert {row["class"] for row in cmp["per_class"]} >= {"background", "dots", "stripes"}
    assert reg.read_pointer(registry)["model_id"] == good["model_id"]  # unmoved
    assert (Path(registry) / "releases" / result["model_id"] / "card.json").exists()  # published, not promoted

    forced = promote(models["bad"], registry, ground_truth=gt, force=True, reason="rollback drill").result()
    pointer = reg.read_pointer(registry)
    assert forced["promoted"] and forced["forced"]
    assert pointer["model_id"] == forced["model_id"] and pointer["forced"] and pointer["reason"] == "rollback drill"

    back = promote(models["good"], registry, ground_truth=gt).result()  # better than the current: passes
    assert back["promoted"] and not back["forced"] and back["comparison"]["delta"] > 0
    history = reg.promotion_history(registry)
    assert [h["model_id"] for h in history] == [good["model_id"], forced["model_id"], good["model_id"]]
    assert [h["forced"] for h in history] == [False, True, False]
    assert reg.read_pointer(registry) == history[-1]


def test_without_ground_truth_the_gate_scores_image_level_map_on_the_held_out_shards(prefect_harness, models,
                                                                                   tmp_path):
    registry = str(tmp_path / "registry")
    assert promote(models["good"], registry).result()["promoted"]  # shards: the ones the model was trained on
    refused = promote(models["bad"], registry, shards=models["shards"])
    assert refused.is_failed()
    cmp = refused.result(raise_on_failure=False)["comparison"]
    assert cmp["metric"] == "map" and cmp["set"] == "val split of the shards"
    assert cmp["candidate"] < cmp["current"]
    # within the tolerance the same comparison passes
    assert promote(models["bad"], registry, shards=models["shards"], tolerance=1.0).result()["promoted"]


def test_the_pointer_never_names_a_half_written_release(tmp_path, tiny_checkpoint):
    registry = str(tmp_path / "registry")
    done = reg.publish_release(registry, tiny_checkpoint(["a", "b"]))
    reg.write_pointer(registry, done.model_id)
    pointer = (tmp_path / "registry" / "current.json").read_bytes()

    half = tiny_checkpoint(["a", "b"], seed=5)  # model.pt written, the card (written last) not yet
    half_id, _ = reg.content_id(half)
    (tmp_path / "registry" / "releases" / half_id).mkdir()
    (tmp_path / "registry" / "releases" / half_id / "model.pt").write_bytes(half[: len(half) // 2])
    with pytest.raises(reg.RegistryError, match="incomplete"):
        reg.write_pointer(registry, half_id)
    # a card whose model.pt is truncated is refused as well
    (tmp_path / "registry" / "releases" / half_id / "card.json").write_text(json.dumps(reg.model_card(half)))
    with pytest.raises(reg.RegistryError, match="sha256"):
        reg.write_pointer(registry, half_id)
    assert (tmp_path / "registry" / "current.json").read_bytes() == pointer
    assert len(reg.promotion_history(registry)) == 1
    # a broken release is not repaired in place: removed by hand, then published whole, it may be promoted
    with pytest.raises(reg.RegistryError, match="never rewritten"):
        reg.publish_release(registry, half)
    shutil.rmtree(tmp_path / "registry" / "releases" / half_id)
    reg.publish_release(registry, half)
    assert reg.write_pointer(registry, half_id)["previous"] == done.model_id


# ----------------------------------------------------------------------------- consumers


def test_resolving_a_registry_or_its_pointer(tmp_path, tiny_checkpoint):
    registry = str(tmp_path / "registry")
    plain = tmp_path / "model.pt"
    plain.write_bytes(tiny_checkpoint(["a", "b"]))
    assert reg.resolve_model(str(plain)) == reg.ResolvedModel(str(plain), None, None)
    release = reg.publish_release(registry, plain.read_bytes())
    with pytest.raises(reg.RegistryError, match="no current release"):
        reg.resolve_model(registry)
    reg.write_pointer(registry, release.model_id)
    for url in (registry, registry + "/", f"{registry}/current.json", f"file://{registry}"):
        resolved = reg.resolve_model(url)
        assert resolved.model_id == release.model_id
        assert resolved.url.endswith(f"releases/{release.model_id}/model.pt")
    with pytest.raises(reg.RegistryError, match="not release"):
        reg.resolve_model(registry).check("0" * 16)


def test_segment_and_thresholds_resolve_the_registry_once_and_record_the_model_id(prefect_harness, models,
                                                                                  tmp_path):
    from weakseg.flows.choose_thresholds import choose_thresholds
    from weakseg.flows.segment_corpus import segment_corpus
    from weakseg.tasks.segment import tables

    registry = str(tmp_path / "registry")
    release = reg.publish_release(registry, Path(models["good"]).read_bytes())
    reg.write_pointer(registry, release.model_id)
    images = tmp_path / "images"
    images.mkdir()
    for jpg in sorted(Path(models["data"], "JPEGImages").glob("val_*.jpg"))[:3]:
        shutil.copy(jpg, images)

    summary = segment_corpus(images=str(images), model=registry, out=str(tmp_path / "out"), priors="ilp",
                             max_side=96, tta="1", device="cpu", thumbnails=0, run_id="reg-run")
    assert summary["model_id"] == release.model_id
    row = tables.read_table(str(tmp_path / "out"), "runs").to_pylist()[0]
    assert row["model_id"] == release.model_id and row["model_uri"] == release.model_url
    assert json.loads(row["parameters"])["model"] == registry
    assert {r["model_id"] for r in tables.read_table(str(tmp_path / "out"), "images").to_pylist()} == {
        release.model_id}

    doc = choose_thresholds(model=f"{registry}/current.json", ground_truth=models["data"],
                            out=str(tmp_path / "t.json"), priors="ilp,bb", limit=3, max_side=96, tta="1",
                            device="cpu")
    assert doc["search"]["model_id"] == release.model_id


# ----------------------------------------------------------------------------- the command


def test_weakseg_promote_exits_0_when_promoted_and_1_when_refused(prefect_harness, models, tmp_path, capsys):
    registry = str(tmp_path / "registry")
    common = ["--registry", registry, "--ground-truth", models["data"], "--max-side", "96", "--tta", "1",
              "--device", "cpu", "--limit", "6"]
    assert main(["promote", "--model", models["good"], *common]) == 0
    assert main(["promote", "--model", models["bad"], *common]) == 1
    assert "refused" in capsys.readouterr().err
    assert main(["promote", "--model", models["bad"], *common, "--force"]) == 0
    assert reg.read_pointer(registry)["model_id"] == load_model(models["bad"]).model_id


def test_releases_and_promotion_on_s3(prefect_harness, s3, models):
    registry = "s3://weakseg-test/registry"
    result = promote(models["good"], registry, ground_truth=models["data"], limit=4).result()
    assert result["promoted"]
    assert s3.exists(f"weakseg-test/registry/releases/{result['model_id']}/card.json")
    assert s3.cat_file(f"weakseg-test/registry/releases/{result['model_id']}/model.pt") == Path(
        models["good"]).read_bytes()
    resolved = reg.resolve_model(registry)
    assert resolved.url == f"{registry}/releases/{result['model_id']}/model.pt"
    assert load_model(resolved.url, "cpu").model_id == result["model_id"]
    assert storage.read_json(f"{registry}/current.json")["history"].startswith("history/")
    assert reg.publish_release(registry, Path(models["good"]).read_bytes()).model_id == result["model_id"]



def test_a_url_with_a_query_is_a_checkpoint_not_a_registry() -> None:
    """A signed URL names one file: nothing is probed after its query (a server would answer
    ``model.pt?token=...//current.json`` with the checkpoint itself)."""
    from weakseg.tasks.registry import resolve_model

    url = "http://127.0.0.1:9/model.pt?token=s3cret"  # the discard port: any request would fail
    resolved = resolve_model(url)
    assert (resolved.url, resolved.model_id, resolved.registry) == (url, None, None)


# ----------------------------------------------------------------------------- concurrent promotions


@pytest.fixture
def hooks():
    """``hookmem://`` (tests/hookfs.py) with no hooks left over."""
    from hookfs import HookFS

    HookFS.reset()
    yield HookFS
    HookFS.reset()


@pytest.fixture(scope="module")
def six(tiny_checkpoint) -> list[bytes]:
    """Six distinct small checkpoints (made once: each costs a second or two)."""
    return [tiny_checkpoint(["a", "b"], seed=s) for s in range(6)]


class Killed(BaseException):
    """The process dies here (a BaseException: no handler, no retry)."""


def _gate_score(model: str, data: str) -> float:
    """The gate's score of a model, computed apart from the flow (same set and settings as ``GATE``)."""
    from weakseg.tasks.evaluate.promotion import score_on_ground_truth

    return score_on_ground_truth(load_model(model, "cpu"), data, "val", "ilp,sppxl", GATE["max_side"], GATE["tta"],
                                 GATE["limit"])["value"]


@pytest.mark.slow
def test_a_candidate_whose_baseline_moved_is_compared_again_with_the_new_current(prefect_harness, models, tmp_path,
                                                                               tiny_checkpoint, hooks):
    """Promotion A starts while X is current; while A scores X, promotion B (compared with X) moves the
    pointer to B. A must be compared with B before it replaces B: its entry's ``previous`` is the
    release its comparison was made against; and the registry's concurrency limit was held."""
    from prefect.client.orchestration import get_client

    classes = list(load_model(models["good"], "cpu").classes)
    registry = f"hookmem://promotions-{tmp_path.name}"
    x = reg.publish_release(registry, Path(models["bad"]).read_bytes()).model_id
    b_path = tmp_path / "b.pt"
    b_path.write_bytes(tiny_checkpoint(classes, seed=4))
    b = reg.publish_release(registry, b_path.read_bytes()).model_id
    reg.write_pointer(registry, x)
    held: dict[str, int] = {}

    def b_lands_while_a_scores_x(path: str) -> None:
        if path.endswith(f"releases/{x}/model.pt"):
            hooks.on_read.clear()
            with get_client(sync_client=True) as client:
                held.update({lim.name: lim.active_slots for lim in client.read_global_concurrency_limits(limit=200)
                             if lim.active_slots})
            reg.write_pointer(registry, b, comparison={"baseline": x})

    hooks.on_read.append(b_lands_while_a_scores_x)
    state = promote(models["good"], registry, ground_truth=models["data"])
    assert state.is_completed(), state.message
    result = state.result()
    a = result["model_id"]
    assert result["promoted"] and result["previous"] == b
    assert result["comparison"]["current"] == pytest.approx(_gate_score(str(b_path), models["data"]))  # scored B
    assert result["comparison"]["baseline"] == b
    pointer = reg.read_pointer(registry)
    assert pointer["model_id"] == a and pointer["previous"] == b == pointer["comparison"]["baseline"]
    history = reg.promotion_history(registry)
    assert [(h["sequence"], h["model_id"], h["previous"]) for h in history] == [(1, x, None), (2, b, x), (3, a, b)]
    assert history[-1] == pointer

    from weakseg.flows._registry import registry_limit

    assert held == {registry_limit(registry): 1}  # the flow held its registry's slot while it scored


def test_a_stale_baseline_is_refused_by_the_pointer_itself(tmp_path, six):
    registry = str(tmp_path / "registry")
    x, b, a = (reg.publish_release(registry, data).model_id for data in six[:3])
    reg.write_pointer(registry, x)
    with pytest.raises(reg.BaselineMoved, match="moved from none to"):  # compared with "no release", but X came
        reg.write_pointer(registry, a, expected=None)
    reg.write_pointer(registry, b, expected=x)
    with pytest.raises(reg.BaselineMoved, match=f"moved from {x} to {b}"):
        reg.write_pointer(registry, a, expected=x)
    assert reg.read_pointer(registry)["model_id"] == b
    assert [h["model_id"] for h in reg.promotion_history(registry)] == [x, b]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_concurrent_promotions_never_share_a_sequence_and_the_history_is_every_move(tmp_path, six, where):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    registry = str(tmp_path / "registry") if where == "local" else f"memory://concurrent-{tmp_path.name}"
    ids = [reg.publish_release(registry, data).model_id for data in six]
    start = threading.Barrier(len(ids))

    def promote_now(model_id: str) -> dict:
        start.wait()
        return reg.write_pointer(registry, model_id)

    with ThreadPoolExecutor(len(ids)) as pool:
        docs = list(pool.map(promote_now, ids))
    assert sorted(d["sequence"] for d in docs) == list(range(1, 7))
    history = reg.promotion_history(registry)
    assert [h["sequence"] for h in history] == list(range(1, 7))
    assert sorted(h["model_id"] for h in history) == sorted(ids)
    assert [h["previous"] for h in history] == [None] + [h["model_id"] for h in history[:-1]]  # one chain
    assert reg.read_pointer(registry) == history[-1]
    fs, path = storage.url_to_fs(storage.join(registry, "history"))
    assert len([p for p in fs.ls(path, detail=False) if p.endswith(".json")]) == 6


def test_a_crash_between_the_two_writes_leaves_no_phantom_and_loses_no_promotion(tmp_path, six, hooks):
    registry = f"hookmem://crash-{tmp_path.name}"
    a, b, c = (reg.publish_release(registry, data).model_id for data in six[:3])
    reg.write_pointer(registry, a)

    def die_at(fragment: str):
        def hook(path: str) -> None:
            if fragment in path:
                raise Killed(path)
        return hook

    hooks.on_write.append(die_at("/current.json"))  # killed before the pointer moved: nothing was promoted
    with pytest.raises(Killed):
        reg.write_pointer(registry, b)
    hooks.reset()
    assert reg.read_pointer(registry)["model_id"] == a
    assert [h["model_id"] for h in reg.promotion_history(registry)] == [a]

    hooks.on_write.append(die_at("/history/"))  # killed after the pointer moved, before its entry
    with pytest.raises(Killed):
        reg.write_pointer(registry, c)
    hooks.reset()
    assert [(h["sequence"], h["model_id"]) for h in reg.promotion_history(registry)] == [(1, a), (2, c)]
    reg.write_pointer(registry, b)  # the next promotion writes the entry the crash left unwritten
    fs, path = storage.url_to_fs(storage.join(registry, "history"))
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == [
        "000001.json", "000002.json", "000003.json"]
    assert [(h["sequence"], h["model_id"], h["previous"]) for h in reg.promotion_history(registry)] == [
        (1, a, None), (2, c, a), (3, b, c)]


def test_the_pointer_swap_is_conditional_on_s3(s3, six):
    registry = "s3://weakseg-test/cas-registry"
    x, b, a = (reg.publish_release(registry, data).model_id for data in six[:3])
    reg.write_pointer(registry, x)
    pointer = f"{registry}/current.json"
    held = storage.read_version(pointer)
    assert held is not None and held.etag
    # the store itself refuses a write whose If-Match names an older ETag, even with the same bytes read
    assert not storage.replace_if(pointer, b"{}", storage.Version(held.data, '"0123456789abcdef0123456789abcdef"'))
    assert storage.read_bytes(pointer) == held.data
    reg.write_pointer(registry, b, expected=x)
    assert not storage.replace_if(pointer, b"{}", held)  # what was read has been replaced since
    assert not storage.replace_if(f"{registry}/history/000001.json", b"{}", None)  # If-None-Match: *
    with pytest.raises(reg.BaselineMoved):
        reg.write_pointer(registry, a, expected=x)
    assert [(h["sequence"], h["model_id"]) for h in reg.promotion_history(registry)] == [(1, x), (2, b)]
    assert reg.read_pointer(registry)["model_id"] == b
