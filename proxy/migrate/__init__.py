"""The guarded migration (issue 9): phases, guards, the cut-over and its way back, decommission."""
