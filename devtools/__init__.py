"""Development tools: a stand-in for Spotify, the server as a real process, nginx in front, load harnesses.

`make run` (devtools/run.py), the tests and the benchmarks import this package; the service itself never does.
"""
