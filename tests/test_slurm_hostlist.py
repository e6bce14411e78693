"""The rendezvous host under srun: the first host of the step's node list, in every host-list form.

Which processes become ranks, and the port: tests/test_slurm_tasks.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from otr_cli.train.distributed import expand_hostlist, first_slurm_host

FORMS = {
    "node7": ["node7"],
    "a,b": ["a", "b"],
    "gpu[01-04]": ["gpu01", "gpu02", "gpu03", "gpu04"],
    "gpu[1,3-5]": ["gpu1", "gpu3", "gpu4", "gpu5"],
    "a[1-2],b[3]": ["a1", "a2", "b3"],
    "gpu01,gpu[03-04]": ["gpu01", "gpu03", "gpu04"],
    "gpu[098-101]": ["gpu098", "gpu099", "gpu100", "gpu101"],
    "rack[1-2]-n[08-09]": ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"],
}


@pytest.mark.parametrize("nodelist, hosts", FORMS.items(), ids=list(FORMS))
def test_every_host_list_form_expands_in_slurm_order(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def _minimal_slurm_conf(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost CPUs=2\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    return conf


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol is not installed")
def test_the_parser_agrees_with_scontrol_show_hostnames(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(_minimal_slurm_conf(tmp_path)))
    for nodelist, hosts in FORMS.items():
        shown = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()
        assert shown == hosts, nodelist


def test_first_host_without_scontrol_comes_from_the_parser(monkeypatch):
    # The old parser returned "gpu01,gpu03" here: a rendezvous address no rank could resolve.
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert first_slurm_host("gpu01,gpu[03-04]") == "gpu01"
    assert first_slurm_host("a[1-2],b[3]") == "a1"


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol is not installed")
def test_first_host_asks_scontrol_when_it_works(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(_minimal_slurm_conf(tmp_path)))
    assert first_slurm_host("gpu01,gpu[03-04]") == "gpu01"
