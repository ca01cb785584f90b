"""Tests for haraka_tw.workers."""
