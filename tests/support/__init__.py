"""Test-support helpers: a fake OpenAI-compatible model server and a TCP outage proxy."""
