"""Data for fine-tuning and evaluation: read the rows, render them to text, tokenize with response masks."""
