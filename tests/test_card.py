"""The model card of the demo build, read as the Hub and a user would: front matter parsed by
huggingface_hub.ModelCard, tables checked against the fixture's own config and the build's report,
no path of the builder's machine; the recipe's `card:` section overriding the defaults."""

from __future__ import annotations

import json
import re

import pytest
from huggingface_hub import ModelCard

from conftest import BODY, ROOT, demo_recipe, write_recipe
from forgekit.build import card
from forgekit.errors import RecipeError
from forgekit.plan import make_plan
from forgekit.recipe import load_recipe

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ABSOLUTE_PATH = re.compile(r"(?:^|[\s(`'\"=])/(?:[\w.-]+/)+")


@pytest.fixture(scope="module")
def demo_card(built_demo) -> str:
    return (built_demo / "README.md").read_text()


def test_front_matter_parses_as_a_hub_model_card(demo_card):
    data = ModelCard(demo_card).data.to_dict()
    assert data["library_name"] == "mlx" and data["pipeline_tag"] == "text-generation"
    assert data["tags"][:6] == ["mlx", "mtplx", "mtp", "speculative-decoding", "qwen3_5", "4-bit"]
    assert "license" not in data and "base_model" not in data  # local fixture: nothing to inherit from


def test_architecture_table_is_the_fixtures_config(demo_card):
    text = json.loads((BODY / "config.json").read_text())["text_config"]
    full = text["layer_types"].count("full_attention")
    expected = [f"| decoder layers | {text['num_hidden_layers']} ({full} full attention, "
                f"{text['num_hidden_layers'] - full} linear attention) |",
                "| MTP layers | 1 |", f"| hidden size | {text['hidden_size']} |",
                f"| attention heads / KV heads / head dim | {text['num_attention_heads']} / "
                f"{text['num_key_value_heads']} / {text['head_dim']} |",
                f"| vocabulary | {text['vocab_size']} |", f"| max context (tokens) | {text['max_position_embeddings']} |",
                "| MTPLX architecture id | `qwen3-next-mtp` |"]
    lines = demo_card.splitlines()
    assert [line for line in expected if line not in lines] == []


def test_usage_sampling_and_size(demo_card, built_demo):
    lines = demo_card.splitlines()
    assert "MODEL=demo-under-test   # the Hub repo id, or a local copy of this directory" in lines
    assert 'mtplx serve --model "$MODEL" --chat-template-profile local_qwen36 --reasoning-parser qwen3' in lines
    assert 'mlx_lm.generate --model "$MODEL" --prompt "Hello"' in lines
    assert "| temperature | top_p | top_k |" in lines and "| 0.6 | 0.95 | 20 |" in lines
    assert any(line.startswith("| MTP head (sidecar, not in the index) | `mtp.safetensors` | bfloat16: 15 tensors |")
               for line in lines)
    on_disk = sum(p.stat().st_size for p in built_demo.iterdir() if p.is_file() and p.name != "README.md")
    assert f"| **total on disk** |  |  | **{on_disk / 1024:.1f} KiB** |" in lines


def test_verification_table_has_a_row_per_step(demo_card, built_demo):
    report = json.loads((built_demo / "forgekit-report.json").read_text())
    lines = demo_card.splitlines()
    for result in report["results"]:
        verdict = "skipped" if result.get("skipped") else "passed"
        assert any(line.startswith(f"| {result['step']} | {verdict} | ") for line in lines), result["step"]
    parity = report["summary"]["parity"]
    assert f"| parity | passed | top-1 {parity['top1']}, mean KL {parity['mean_kl']} nats over " \
           f"{parity['positions']} positions |" in lines
    assert "Status: `cpu_verified_by_forgekit`" in demo_card
    assert '{"' not in demo_card  # no raw JSON


def test_no_path_of_the_builders_machine(demo_card, built_demo):
    assert str(ROOT) not in demo_card and str(built_demo.parent) not in demo_card
    assert ABSOLUTE_PATH.search(demo_card) is None, ABSOLUTE_PATH.search(demo_card)
    assert "| body | local | - | `model-00001-of-00002.safetensors` xxh3-128 `" in demo_card
    assert "| mtp | local | - | `tiny-MTP-BF16.gguf` xxh3-128 `" in demo_card


def test_no_published_file_names_a_path_of_the_builders_machine(built_demo):
    for name in ("mtplx_runtime.json", "config.json", "README.md"):
        text = (built_demo / name).read_text()
        assert str(ROOT) not in text and str(built_demo.parent) not in text, name


def test_the_path_check_catches_a_path():
    assert ABSOLUTE_PATH.search("- **body**: /home/me/models/body; stored as BF16")
    assert ABSOLUTE_PATH.search("| body | `/tmp/x/body` |")
    reason = "mtplx not importable (OSError: /usr/lib/libSystem.B.dylib: cannot open shared object file)"
    assert card.without_paths(reason) == "mtplx not importable (OSError: libSystem.B.dylib: cannot open shared object file)"


def test_card_section_overrides_license_base_model_and_tags(tmp_path):
    recipe = demo_recipe(tmp_path, extra="card:\n  title: Tiny MTP demo\n  license: other\n  license_name: demo\n"
                                          "  base_model: acme/tiny-base\n  tags: [demo, 4-bit]\n  repo: acme/tiny\n")
    plan = make_plan(load_recipe(recipe))
    meta = card.front_matter(plan, {"model_type": "qwen3_5"})
    assert (meta["license"], meta["license_name"], meta["base_model"]) == ("other", "demo", "acme/tiny-base")
    assert meta["tags"] == ["mlx", "mtplx", "mtp", "speculative-decoding", "qwen3_5", "4-bit", "demo"]
    text = card.model_card(plan, {"model_type": "qwen3_5"}, {}, {"results": []}, {}, "unverified_no_forgekit_checks_ran")
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# Tiny MTP demo"
    assert "MODEL=acme/tiny   #" in text and "License: `other`, set by the recipe." in text


def test_card_section_refuses_an_unknown_key(tmp_path):
    recipe = write_recipe(tmp_path, f"extends: {ROOT / 'recipes' / 'tiny-demo.yaml'}\nname: t\ncard:\n  licence: mit\n")
    with pytest.raises(RecipeError, match=re.escape(f"{recipe}:4: card.licence: unknown key")):
        load_recipe(recipe)


def test_with_repo_and_unverified_banner():
    text = "---\nlibrary_name: mlx\n---\n\n# x\n\n```bash\nMODEL=x   # the Hub repo id\n```\n"
    published = card.with_repo(text, "acme/x")
    assert "MODEL=acme/x   # the Hub repo id" in published and published.count("acme/x") == 1
    marked = card.marked_unverified(published, "its verification did not pass")
    assert ModelCard(marked).data.to_dict() == {"library_name": "mlx"}
    assert marked.split("\n---\n", 1)[1].lstrip().startswith(card.UNVERIFIED_BANNER)
