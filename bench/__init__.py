"""Benchmark harness: botline against a direct call and LiteLLM, on one machine.

``python -m bench`` starts a fake OpenAI-compatible upstream, botline (one gateway and one
worker, on the running RabbitMQ and Redis) and LiteLLM's proxy, drives all three with the
same load generator in a process of its own, and prints a table, with a PNG chart and the
raw results written to ``bench/results/``. ``--quick`` is a few-second smoke run for CI.

Modules: :mod:`bench.procs` (subprocesses and ``/proc`` readings), :mod:`bench.targets`
(starting and stopping the three systems), :mod:`bench.load` (the load generator),
:mod:`bench.workloads` (what is run, interleaved, and how rounds are combined),
:mod:`bench.sysinfo` (versions and machine) and :mod:`bench.report` (table, chart, JSON).
"""
