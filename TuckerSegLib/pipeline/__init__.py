"""TotalSegmentator's own segmentation pipeline run with compressed networks (hook, input checks, API)."""
