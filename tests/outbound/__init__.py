"""Tests for haraka_tw.outbound."""
