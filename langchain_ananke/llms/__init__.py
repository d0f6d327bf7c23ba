"""LangChain model classes: ``AnankeLLM`` (BaseLLM) and ``ChatAnanke`` (BaseChatModel)."""

from langchain_ananke.llms.chat import ChatAnanke
from langchain_ananke.llms.llm import AnankeLLM

__all__ = ["AnankeLLM", "ChatAnanke"]
