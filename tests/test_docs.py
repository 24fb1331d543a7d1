"""The reference pages generated from the code are current, and say something of every key."""

from pathlib import Path

from sae_ray.config.reference import reference, undescribed

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_config_key_has_a_description():
    assert undescribed() == []


def test_the_configuration_reference_is_current():
    """Regenerate with `python -m sae_ray.config.reference > docs/configuration.md`."""
    assert (DOCS / "configuration.md").read_text() == reference()


def test_the_reference_names_every_key_of_the_quickstart():
    import yaml

    page = (DOCS / "configuration.md").read_text()
    sweep = yaml.safe_load((DOCS.parent / "sweeps" / "quickstart.yaml").read_text())
    for section, keys in sweep.items():
        for key in keys:
            assert f"`{section}.{key}`" in page, f"{section}.{key}"


def test_every_reported_metric_has_a_meaning():
    from sae_ray.config.glossary import meanings
    from sae_ray.config.metrics import known_metrics

    known = meanings()
    assert [m for m in known_metrics() if m not in known] == []
    assert all(known.values())


def test_the_metrics_glossary_is_current():
    """Regenerate with `python -m sae_ray.config.glossary > docs/metrics.md`."""
    from sae_ray.config.glossary import glossary

    assert (DOCS / "metrics.md").read_text() == glossary()
