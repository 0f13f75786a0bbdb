"""`make bench`: syncworker measured with real `syncworker run` processes on a
real PostgreSQL, next to procrastinate run the same way. One module per
scenario; `python -m bench.run` runs them all and writes bench/results/latest.json."""
