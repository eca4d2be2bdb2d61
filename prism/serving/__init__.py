"""Multi-model co-serving: device worker, local scheduling, placement, controller."""
