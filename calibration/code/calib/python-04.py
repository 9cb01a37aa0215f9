"""Tokenizer and evaluator for simple arithmetic expressions.

Supports integers, decimals, + - * / ^, unary minus and parentheses.
The evaluator is a small precedence-climbing parser over the token list.

示例:  evaluate("2 * (3 + 4) ^ 2")  ->  98.0
"""
import re
from dataclasses import dataclass
from typing import Iterator, List

TOKEN_RE = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|(.))")

# 运算符优先级与结合性 (precedence, right-associative?)
BINARY = {"+": (1, False), "-": (1, False), "*": (2, False),
          "/": (2, False), "^": (3, True)}


@dataclass
class Token:
    kind: str   # "num", "op", "lparen", "rparen", "end"
    text: str
    pos: int


def tokenize(src: str) -> Iterator[Token]:
    pos = 0
    src = src.rstrip()
    while pos < len(src):
        m = TOKEN_RE.match(src, pos)
        if not m:
            break
        number, other = m.groups()
        start = m.start(1) if number else m.start(2)
        if number:
            yield Token("num", number, start)
        elif other in BINARY:
            yield Token("op", other, start)
        elif other == "(":
            yield Token("lparen", other, start)
        elif other == ")":
            yield Token("rparen", other, start)
        else:
            raise SyntaxError(f"unexpected character {other!r} at {start}")
        pos = m.end()
    yield Token("end", "", len(src))


class Parser:
    def __init__(self, src: str):
        self.tokens: List[Token] = list(tokenize(src))
        self.i = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def atom(self) -> float:
        tok = self.take()
        if tok.kind == "num":
            return float(tok.text)
        if tok.kind == "op" and tok.text == "-":
            # 一元负号的优先级高于乘除, 但低于乘方: -2^2 == -4
            return -self.expr(3)
        if tok.kind == "lparen":
            value = self.expr(1)
            if self.take().kind != "rparen":
                raise SyntaxError(f"missing ')' for '(' at {tok.pos}")
            return value
        raise SyntaxError(f"unexpected {tok.text or 'end of input'!r} at {tok.pos}")

    def expr(self, min_prec: int) -> float:
        left = self.atom()
        while True:
            tok = self.peek()
            if tok.kind != "op":
                return left
            prec, right_assoc = BINARY[tok.text]
            if prec < min_prec:
                return left
            self.take()
            right = self.expr(prec if right_assoc else prec + 1)
            left = apply(tok.text, left, right)


def apply(op: str, a: float, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            raise ZeroDivisionError("division by zero in expression")
        return a / b
    return a ** b


def evaluate(src: str) -> float:
    parser = Parser(src)
    value = parser.expr(1)
    if parser.peek().kind != "end":
        tok = parser.peek()
        raise SyntaxError(f"trailing input {tok.text!r} at {tok.pos}")
    return value


if __name__ == "__main__":
    for line in ["1 + 2 * 3", "(1 + 2) * 3", "2 ^ 3 ^ 2", "-2 ^ 2", "7 / 2"]:
        print(f"{line:<14} = {evaluate(line)}")
