"""The memory plan and the fit: what a run will hold on the card before any weight loads, and the config that fits.

`fit.fit_config(data)` is the one path from a user's keys (+ preset) and the device to a config (CLI, Config tab and
Train tab alike); `memory.plan_memory(cfg, family, card_gb)` is the per-component table behind it, measured on the
meta device (`probes`, `trace`); `report` holds the plan as data (no torch: the UI imports it).
"""
