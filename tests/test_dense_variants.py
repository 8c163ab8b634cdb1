"""Tied (0.8B/2B/4B shape) and text-only (`qwen3_5_text`) dense finetunes, each built by a real
doit run from a few-line child recipe of a shipped base: body bit-identical to mlx_lm.convert of
the same weights (text-only: of the same weights in nested form, tiny/body), MTPLX's tensor gate
passes, MTPLX's runtime decodes it token-identical to plain decoding; contradictions and
incomplete sources are refused in one line, exit 2, nothing published."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import pytest

from conftest import BODY, run_doit
from variants import TIED, child_recipe, text_only, text_only_without, text_recipe, tied_copy, tied_recipe
from forgekit.recipe import VERIFY_STEP
from forgekit.verify import run_step

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MTPLX_STEP = VERIFY_STEP.validate_python({"step": "mtplx", "params": {"prompts": ["<|im_start|>ab", "<|im_start|>Kx", "<|im_start|>7q"],
                                               "new_tokens": 16, "depth": 3,
                                               "min_acceptance": [0.95, 0.90, 0.85]}})


def build(work, text: str):
    (work / "recipe.yaml").write_text(text)
    return run_doit(work / "recipe.yaml", work)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Both variants built once: {'tied': out dir, 'text': out dir}."""
    out = {}
    tied_work = tmp_path_factory.mktemp("tied")
    proc = build(tied_work, tied_recipe(TIED, tied_work / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out["tied"] = tied_work / "out"
    text_work = tmp_path_factory.mktemp("text")
    body = text_only(text_work / "body")
    proc = build(text_work, text_recipe(body, text_work / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out["text"] = text_work / "out"
    return out


def trunk(directory) -> dict:
    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


@pytest.fixture(scope="module")
def converted(mlx_lm_converted) -> dict:
    """mlx_lm.convert -q 4/g64 of the tied body and of the nested form of the text-only weights."""
    return {name: mlx_lm_converted(source) for name, source in (("tied", TIED), ("text", BODY))}


@pytest.mark.parametrize("variant", ["tied", "text"])
def test_body_is_bit_identical_to_mlx_lm_convert(built, converted, variant):
    ours, theirs = trunk(built[variant]), trunk(converted[variant])
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert bytes(memoryview(ours[k])) == bytes(memoryview(theirs[k])), f"{variant}: {k} differs"
    ours_cfg = json.loads((built[variant] / "config.json").read_text())
    theirs_cfg = json.loads((converted[variant] / "config.json").read_text())
    for key in ("model_type", "tie_word_embeddings"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert ours_cfg["text_config"]["tie_word_embeddings"] == theirs_cfg["text_config"]["tie_word_embeddings"]


def test_tied_build_has_no_lm_head_and_says_tied(built):
    assert not any("lm_head" in k for k in trunk(built["tied"]))
    cfg = json.loads((built["tied"] / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["text_config"]["tie_word_embeddings"] is True


def test_text_only_build_is_the_nested_form(built):
    cfg = json.loads((built["text"] / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5" and cfg["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "qwen3_5_text" and "architectures" not in cfg["text_config"]
    assert cfg["text_config"]["hidden_size"] == 64 and cfg["tie_word_embeddings"] is False


@pytest.mark.parametrize("variant", ["tied", "text"])
def test_verify_probes_ran_and_passed(built, variant):
    report = json.loads((built[variant] / "forgekit-report.json").read_text())
    summary = report["summary"]
    assert report["passed"] and summary["parity"]["top1"] >= 0.93, summary["parity"]
    assert min(summary["mtp"]["acceptance"]) >= 0.85, summary["mtp"]


@pytest.mark.parametrize("variant", ["tied", "text"])
def test_mtplx_tensor_gate_passes(built, variant):
    from mtplx.artifacts import inspect_model

    report = inspect_model(str(built[variant].resolve()))
    assert report.mtp.passes_tensor_gate, report.mtp


@pytest.fixture(scope="module")
def standin():
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the libSystem stand-in")
    import mtplx_standin

    mtplx_standin.install()


@pytest.mark.parametrize("variant", ["tied", "text"])
def test_mtplx_runtime_decodes_identical_to_plain_decoding(standin, built, variant):
    result = run_step(MTPLX_STEP, built[variant], None)
    assert result["passed"] and "skipped" not in result, result
    assert result["summary"]["equals_ar"] is True
    assert [run["depth"] for run in result["summary"]["by_depth"]] == [1, 2, 3]


# ------------------------------------------------------------ refused, one line, exit 2

def tied_config_untied(tmp):
    body = tied_copy(tmp / "tied", tie_word_embeddings=False)
    return tied_recipe(body, tmp / "out"), r"tied/config\.json: config says text_config\.tie_word_embeddings: " \
                                           r"false but the body has no lm_head tensor, so it is tied"


def untied_config_tied(tmp):
    body = text_only(tmp / "text")          # untied (has lm_head.weight), config claims tied
    cfg = json.loads((body / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (body / "config.json").write_text(json.dumps(cfg))
    return text_recipe(body, tmp / "out"), r"text/config\.json: config says text_config\.tie_word_embeddings: " \
                                           r"true but the body has the lm_head tensor"


def text_missing_norm(tmp):
    body = text_only_without(tmp / "text", "model.norm.weight")
    return text_recipe(body, tmp / "out"), r"text/config\.json: the body gives no tensor for " \
                                           r"'language_model\.model\.norm\.weight'"


@pytest.mark.parametrize("setup", [tied_config_untied, untied_config_tied, text_missing_norm],
                         ids=lambda f: f.__name__)
def test_bad_variant_is_refused_in_one_line(tmp_path, setup):
    text, expected = setup(tmp_path)
    proc = build(tmp_path, text)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert re.search(expected, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_stated_override_builds_a_tied_body_whose_config_says_untied(tmp_path):
    body = tied_copy(tmp_path / "tied", tie_word_embeddings=False)
    override = "config:\n  set: {text_config.tie_word_embeddings: true, tie_word_embeddings: true}\n"
    proc = build(tmp_path, tied_recipe(body, tmp_path / "out", verify="verify: [{step: load}]\n") + override)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["text_config"]["tie_word_embeddings"] is True


# ------------------------------------------------------------ forgekit new picks the base

def new(capsys, tmp_path, *args):
    from forgekit.cli import main

    code = main(["new", "x", "--dir", str(tmp_path / "recipes"), "--force", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_new_picks_the_text_only_base_and_says_what_it_found(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path / "cache"))
    from conftest import HEAD_GGUF

    code, out, err = new(capsys, tmp_path, "--body", text_only(tmp_path / "text"), "--mtp", HEAD_GGUF)
    assert code == 0, err
    assert "detected body: dense, text-only save (Qwen3_5ForCausalLM, flat keys) -> base qwen3.5-text-mtp" in out
    assert "detected embeddings: untied (lm_head.weight present)" in out
    assert "detected head: GGUF block blk.4 (15 tensors), stored BF16, F32" in out
    assert "\nextends: qwen3.5-text-mtp\n" in (tmp_path / "recipes" / "x.yaml").read_text()


def test_new_on_a_tied_body_with_its_own_head(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path / "cache"))
    code, out, err = new(capsys, tmp_path, "--body", TIED, "--mtp", "body")
    assert code == 0, err
    assert "-> base qwen3.5-dense-mtp" in out and "detected embeddings: tied (no lm_head.weight" in out
    assert "detected head: the body's own mtp.* keys: mtp.* (15 tensors), stored bfloat16" in out


def test_new_names_a_contradicting_config_and_picks_the_moe_base(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORGEKIT_CACHE", str(tmp_path / "cache"))
    from forgekit.new_detect import BASES, detect

    facts = detect(str(tied_copy(tmp_path / "tied", tie_word_embeddings=False)), "body").facts
    assert any("tied (no lm_head.weight" in f and "config.json says tie_word_embeddings: false" in f for f in facts)
    moe_body = TIED.parent / "tiny_moe" / "body"
    code, out, err = new(capsys, tmp_path, "--body", moe_body, "--mtp", TIED.parent / "tiny_moe" / "head.gguf")
    assert BASES["qwen3_5_moe"][0] == "qwen3.5-moe-mtp"
    assert code == 0, err
    assert "-> base qwen3.5-moe-mtp" in out


# ------------------------------------------------------------ validate: head shapes, tokenizer, prompt ids

def validate(capsys, recipe):
    from forgekit.cli import main

    code = main(["validate", str(recipe)])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_refuses_a_head_of_another_width(tmp_path, capsys):
    from conftest import BODY_WITH_MTP

    weights = mx.load(str(BODY_WITH_MTP / "model.safetensors"))
    fc = weights["mtp.fc.weight"]
    weights["mtp.fc.weight"] = mx.concatenate([mx.concatenate([fc, fc], axis=1)] * 2, axis=0)   # [128, 256]
    head = tmp_path / "wide-head.safetensors"
    mx.save_safetensors(str(head), weights, metadata={"format": "pt"})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(child_recipe("qwen3.5-dense-mtp", BODY, f"{{path: {head}, table: mtp_hf}}", tmp_path / "o"))
    code, out, err = validate(capsys, recipe)
    assert code == 2 and out == ""
    assert err == (f"forgekit: {head}: head tensor 'mtp.fc.weight' -> 'mtp.fc.weight' has shape [128, 256], "
                   f"the body config says [64, 128]: a head from a model of another size\n")


def test_validate_refuses_text_prompts_without_a_tokenizer(tmp_path, capsys):
    body = text_only(tmp_path / "text")
    (body / "tokenizer.json").unlink()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text_recipe(body, tmp_path / "o"))
    code, out, err = validate(capsys, recipe)
    assert code == 2 and len(err.splitlines()) == 1
    assert re.fullmatch(rf"forgekit: {re.escape(str(recipe))}:\d+: verify step 'parity' has text prompts but the "
                        rf"body \({re.escape(str(body))}\) has no tokenizer .*\n", err), err


def test_validate_refuses_a_prompt_id_outside_the_vocabulary(tmp_path, capsys):
    body = text_only(tmp_path / "text")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text_recipe(body, tmp_path / "o", verify="verify:\n  - {step: mtp, params: {prompts: [[1, 97, 128]]}}\n"))
    code, out, err = validate(capsys, recipe)
    assert code == 2
    assert re.search(r"r\.yaml:\d+: verify\.0 \(mtp\) prompt 0 has token id 128 outside the body's vocabulary "
                     r"\(vocab_size 128\)", err), err
    recipe.write_text(text_recipe(body, tmp_path / "o"))
    code, out, err = validate(capsys, recipe)
    assert code == 0, err
