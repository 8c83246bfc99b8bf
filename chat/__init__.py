"""Falcon Chat: a Gradio chat front end for Falcon chat models."""
